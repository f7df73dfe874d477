"""The training texts a run names (``testbed train --data``, a training suite's ``workload.data``).

An entry is the user's UTF-8 text file or a built-in corpus: ``fortunes:NAME`` (a Debian fortune
collection in ``FORTUNES_DIR``, package ``fortunes``) or ``licenses:NAME`` (a licence text in
``LICENSES_DIR``).  Everything that can be wrong with an entry without the model's tokenizer is checked
here, before anything starts, as one :class:`~testbed.spec.errors.SpecError` line: a NUL byte, a missing
file or corpus, a directory or other non-regular file, a file that cannot be read, an empty one, text
that is not UTF-8.  (Too short for one batch needs the tokenizer: ``testbed.apps.training.data``.)

This module is light (no torch): the CLI's flag checks and the suite validator use it, and the
training data loader reads files through :func:`read_text`, so its messages are the same everywhere.
"""

from __future__ import annotations

import codecs
import stat
from pathlib import Path

from testbed.spec.errors import SpecError, got

FORTUNES_DIR = Path("/usr/share/games/fortunes")
LICENSES_DIR = Path("/usr/share/common-licenses")
CHUNK = 1 << 20  # bytes read at a time while checking a file (a big text is never held twice)


def builtin_corpora(fortunes: Path = FORTUNES_DIR, licenses: Path = LICENSES_DIR
                    ) -> dict[str, tuple[Path, str]]:
    """Every built-in corpus found on this machine: name -> (file, kind), kind ``fortune`` (entries
    separated by lines holding only '%') or ``text``; empty where the packages are missing."""
    out: dict[str, tuple[Path, str]] = {}
    if fortunes.is_dir():
        for p in sorted(fortunes.iterdir()):
            # NAME is the text; NAME.dat is strfile's index; NAME.u8 a link to NAME
            if p.is_file() and not p.is_symlink() and not p.suffix:
                out[f"fortunes:{p.name}"] = (p, "fortune")
    if licenses.is_dir():
        for p in sorted(licenses.iterdir()):
            if p.is_file() and not p.is_symlink():  # GPL -> GPL-3 and the like would be duplicates
                out[f"licenses:{p.name}"] = (p, "text")
    return out


def is_builtin_name(entry: str, path: Path) -> bool:
    """Whether ``entry`` names a built-in corpus rather than a file: it has a ``:`` and no file
    ``path`` (the entry resolved as a file) exists; an existing file always wins."""
    return ":" in entry and not path.exists()


def _open_problem(p: Path) -> str | None:
    """Why ``p`` cannot be a text file (missing, a directory, a FIFO...), or None."""
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        return "no such file"
    except NotADirectoryError:
        return "no such file (a part of the path is not a folder)"
    except OSError as e:
        return f"cannot read the file: {e.strerror}"
    if stat.S_ISDIR(mode):
        return "is a directory, not a text file"
    if not stat.S_ISREG(mode):  # a FIFO or a device would block or never end
        return "is not a regular file (a FIFO, a device...), not a text file"
    return None


def read_text(path: str | Path, file: str, field: str, keep: bool = True) -> str:
    """The file's text, strictly UTF-8, checked as it is read; every problem is
    ``SpecError(file, field, ...)``.  ``keep=False`` only checks (returns "")."""
    p = Path(path)
    if "\0" in str(path):
        raise SpecError(file, field, f"must be a text file without NUL bytes {got(str(path))}")
    problem = _open_problem(p)
    if problem:
        raise SpecError(file, field, f"{problem} {got(str(p))}")
    decoder = codecs.getincrementaldecoder("utf-8")()
    parts: list[str] = []
    offset, text_seen = 0, False
    try:
        with p.open("rb") as f:
            while True:
                chunk = f.read(CHUNK)
                final = not chunk
                pending = len(decoder.getstate()[0])  # bytes of a character cut by the last chunk
                try:
                    text = decoder.decode(chunk, final=final)
                except UnicodeDecodeError as e:  # e.object: the pending bytes, then this chunk
                    bad = bytes(e.object[e.start : e.start + 1]).hex()
                    raise SpecError(file, field, f"not UTF-8 text: byte 0x{bad} at offset "
                                    f"{offset - pending + e.start} {got(str(p))}") from None
                text_seen = text_seen or bool(text.strip())
                if keep:
                    parts.append(text)
                if final:
                    break
                offset += len(chunk)
    except OSError as e:
        raise SpecError(file, field, f"cannot read the file: {e.strerror} {got(str(p))}") from None
    if not text_seen:
        what = "empty" if offset == 0 else "only white space"
        raise SpecError(file, field, f"holds no text ({what}) {got(str(p))}")
    return "".join(parts)


def check_entry(entry: str, path: Path, file: str, field: str,
                builtins: dict[str, tuple[Path, str]] | None = None) -> None:
    """Check one data entry as the user wrote it (``entry``) with ``path`` the file it names (the
    entry resolved against the suite's folder, or as given); a SpecError ``file: field: ...``."""
    if "\0" in entry:
        raise SpecError(file, field, "must be a text file or a built-in corpus without NUL bytes "
                        f"{got(entry)}")
    if is_builtin_name(entry, path):
        found = builtin_corpora() if builtins is None else builtins
        if entry not in found:
            raise SpecError(file, field, "no such file or built-in corpus (fortunes:NAME in "
                            f"{FORTUNES_DIR}, licenses:NAME in {LICENSES_DIR}) {got(entry)}")
        path = found[entry][0]
    read_text(path, file, field, keep=False)


def count_problem(files: int, clients: int) -> str | None:
    """Why ``files`` data entries do not fit ``clients`` devices (one per device, or one shared)."""
    if files in (0, 1, clients):
        return None
    devices = "1 device" if clients == 1 else f"{clients} devices"
    return f"{files} files for {devices}: give one file (split among the devices) or one per device"
