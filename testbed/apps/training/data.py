"""Training text for split fine-tuning: real corpora, one per client, tokenized, batched resumably.

Where the text comes from (``--data``):

* built-in corpora, named ``fortunes:NAME`` (a Debian fortune collection in ``/usr/share/games/fortunes``,
  package ``fortunes``: quotations, poems, Star Trek lines, computer jokes...) or ``licenses:NAME`` (a
  licence text in ``/usr/share/common-licenses``: long legal prose).  They are natural language written by
  people, in visibly different styles, so that clients holding different ones are non-IID;
* the user's own UTF-8 text files, ``--data FILE[,FILE...]``: one client per file, or one file split
  into equal contiguous parts, one per client.

The last ``HOLDOUT`` (10%) of each text's tokens is held out for evaluation; the rest is cut into
windows of ``seq + 1`` tokens (stride ``seq``, so every token is a target once per epoch).  A window is a
*sample*: its index is the sample id that the smashed-data store keys on.

:class:`Batches` draws ``batch`` windows at a time in a seeded order (a fresh permutation per epoch,
epochs following one another without a gap), so the same seed gives the same batches on every node and in
``--local``.  Its cursor is one integer (windows drawn so far): :meth:`Batches.state` /
:meth:`Batches.load_state` save and restore it with a checkpoint.

Public API: ``HOLDOUT``, ``FORTUNES_DIR``, ``LICENSES_DIR``, ``DEFAULT_CORPORA``, :class:`Source`,
:func:`builtin_corpora`, :func:`default_sources`, :func:`parse_data`, :func:`read_text`,
:func:`fortune_text`, :func:`tokenize`, :class:`ClientData`, :func:`load_clients`, :class:`Batch`,
:class:`Batches`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from testbed.spec import corpora
from testbed.spec.errors import SpecError, got

HOLDOUT = 0.1  # the last 10% of every text is held out for perplexity
FORTUNES_DIR = corpora.FORTUNES_DIR
LICENSES_DIR = corpora.LICENSES_DIR
FLAG = "data"  # the field named in error lines (the ``--data`` option)

# The first clients' corpora when no --data is given: big enough for a few epochs of 4 x 64 windows, and
# each in a different register (verse, computer humour, legal prose, aphorisms, science quips, TV
# dialogue), so that a few clients already see clearly different text.
DEFAULT_CORPORA = (
    "fortunes:songs-poems", "fortunes:computers", "licenses:GPL-3", "fortunes:wisdom",
    "fortunes:science", "fortunes:startrek", "fortunes:politics", "licenses:Apache-2.0",
)


@dataclass(frozen=True)
class Source:
    """One text: ``name`` as the user wrote it (or the built-in name), the file, and how to read it."""

    name: str
    path: Path
    kind: str = "text"  # "fortune": entries separated by lines holding only '%'; "text": read as it is

    def text(self) -> str:
        raw = read_text(self.path, self.name)
        return fortune_text(raw) if self.kind == "fortune" else raw


def builtin_corpora() -> dict[str, Source]:
    """Every built-in corpus found on this machine, by name (empty where the packages are missing)."""
    return {name: Source(name, path, kind)
            for name, (path, kind) in corpora.builtin_corpora(FORTUNES_DIR, LICENSES_DIR).items()}


def default_sources(clients: int) -> list[Source]:
    """The built-in corpora of ``clients`` clients: DEFAULT_CORPORA first, then the other collections."""
    found = builtin_corpora()
    order = [n for n in DEFAULT_CORPORA if n in found] + [n for n in found if n not in DEFAULT_CORPORA]
    if len(order) < clients:
        raise SpecError("--data", FLAG, f"only {len(order)} built-in corpora on this machine for {clients} "
                        "clients (Debian packages fortunes and base-files; vagrant/provision.sh), give "
                        f"--data FILE,... {got(clients)}")
    return [found[n] for n in order[:clients]]


def parse_data(value: str | None, clients: int = 1) -> list[Source]:
    """The sources of ``--data`` (None or "" -> the default built-in corpora of ``clients`` clients).

    Entries are comma-separated; an existing file is the user's text, ``fortunes:NAME`` /
    ``licenses:NAME`` a built-in corpus.  The count must be 1 (split among the clients) or ``clients``.
    """
    if not value:
        return default_sources(clients)
    names = [v.strip() for v in value.split(",")]
    if any(not n for n in names):
        raise SpecError("--data", FLAG, f"an empty entry in the list of files {got(value)}")
    if len(names) not in (1, clients):
        raise SpecError("--data", FLAG, f"{len(names)} files for {clients} clients: give one file (split "
                        f"among the clients) or one per client {got(value)}")
    found = builtin_corpora()
    out = []
    for n in names:
        p = Path(n).expanduser()
        if p.exists() or ":" not in n:
            out.append(Source(n, p, "text"))
        elif n in found:
            out.append(found[n])
        else:
            raise SpecError(n, FLAG, "no such file or built-in corpus (fortunes:NAME in "
                            f"{FORTUNES_DIR}, licenses:NAME in {LICENSES_DIR}) {got(n)}")
    return out


def read_text(path: str | Path, name: str | None = None) -> str:
    """The file's text, strictly UTF-8; a missing, unreadable, empty or non-UTF-8 file is a SpecError
    ``NAME: data: ...`` (``testbed.spec.corpora.read_text``: the same checks as the CLI's and suites')."""
    return corpora.read_text(path, name or str(path), FLAG)


def fortune_text(raw: str) -> str:
    """A fortune file's entries as paragraphs: the '%' separator lines are file format, not text."""
    entries, cur = [], []
    for line in raw.splitlines():
        if line.strip() == "%":
            entries.append("\n".join(cur).strip("\n"))
            cur = []
        else:
            cur.append(line)
    entries.append("\n".join(cur).strip("\n"))
    return "\n\n".join(e for e in entries if e.strip()) + "\n"


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids (1-D int64) of ``text`` with the model's tokenizer, without special tokens.

    ``verbose=False``: a whole corpus is longer than the model's context, which is fine here (it is cut
    into windows), so transformers' warning about it would only be noise.
    """
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


@dataclass(frozen=True)
class ClientData:
    """One client's tokens: ``train`` (1-D) for its batches, ``heldout`` (1-D) for perplexity."""

    name: str
    train: torch.Tensor
    heldout: torch.Tensor


def _split(ids: torch.Tensor, holdout: float) -> tuple[torch.Tensor, torch.Tensor]:
    cut = len(ids) - max(int(round(len(ids) * holdout)), 2)  # held out: at least one target
    return ids[:cut], ids[cut:]


def load_clients(sources: Sequence[Source], tokenizer, clients: int, batch: int, seq: int,
                 holdout: float = HOLDOUT) -> list[ClientData]:
    """Tokenize ``sources`` into ``clients`` clients' data; each client must fill at least one batch.

    One source per client: client i gets source i (its last ``holdout`` held out).  One source for
    several clients: its training part is cut into ``clients`` equal contiguous parts and every client
    shares its held-out part.  A text too short for one ``batch`` x ``seq + 1`` batch is a SpecError.
    """
    if len(sources) not in (1, clients):
        raise SpecError("--data", FLAG, f"{len(sources)} files for {clients} clients {got(len(sources))}")
    need = batch * seq + 1  # ``batch`` windows of seq+1 tokens at stride seq
    out = []
    for src in sources:
        train, held = _split(tokenize(tokenizer, src.text()), holdout)
        parts = 1 if len(sources) == clients else clients
        size = len(train) // parts
        if size < need:
            per = f" per client ({parts} clients share it)" if parts > 1 else ""
            raise SpecError(src.name, FLAG, f"too short for one batch of {batch} x {seq + 1} tokens: its "
                            f"training part (the first {1 - holdout:.0%}) needs {need} tokens{per} "
                            f"(got {size} tokens)")
        for k in range(parts):
            name = src.name if parts == 1 else f"{src.name}#{k}"
            out.append(ClientData(name, train[k * size : (k + 1) * size].clone(), held.clone()))
    return out


@dataclass(frozen=True)
class Batch:
    """``tokens`` [batch, seq+1]: inputs are ``tokens[:, :-1]``, targets ``tokens[:, 1:]``.

    ``sample_ids[i]`` is row i's window index (stable across epochs), ``epochs[i]`` the epoch it was drawn
    in (0: first time seen, so a frozen client uploads its smashed data; later: the edge reuses it).
    """

    tokens: torch.Tensor
    sample_ids: tuple[int, ...]
    epochs: tuple[int, ...]

    @property
    def inputs(self) -> torch.Tensor:
        return self.tokens[:, :-1]

    @property
    def targets(self) -> torch.Tensor:
        return self.tokens[:, 1:]


class Batches:
    """Seeded batches of ``batch`` windows of ``seq + 1`` tokens from a 1-D token stream, resumable.

    Epoch e visits every window once in the order ``permutation(seed, stream, e)`` (numpy's PCG64 seeded
    through a SeedSequence of the three numbers, stable across runs and machines).  Batches run on from
    one epoch into the next, so no window is ever skipped.  ``stream`` tells clients sharing a seed apart.
    """

    def __init__(self, tokens: torch.Tensor, batch: int, seq: int, seed: int = 0, stream: int = 0) -> None:
        if batch < 1 or seq < 1:
            raise ValueError(f"batch and seq must be >= 1, got {batch}, {seq}")
        self.tokens = tokens.to(torch.long).reshape(-1)
        self.batch, self.seq, self.seed, self.stream = batch, seq, seed, stream
        self.samples = (len(self.tokens) - 1) // seq
        if self.samples < batch:
            raise ValueError(f"{len(self.tokens)} tokens give {self.samples} windows of {seq + 1}, "
                             f"fewer than one batch of {batch}")
        self.position = 0  # windows drawn so far: the whole cursor
        self._order: tuple[int, np.ndarray] | None = None

    def sample(self, sample_id: int) -> torch.Tensor:
        """Window ``sample_id``: ``seq + 1`` tokens starting at ``sample_id * seq``."""
        start = sample_id * self.seq
        return self.tokens[start : start + self.seq + 1]

    def order(self, epoch: int) -> np.ndarray:
        """The window order of ``epoch`` (cached for the current one)."""
        if self._order is None or self._order[0] != epoch:
            seeds = np.random.SeedSequence([self.seed, self.stream, epoch])
            rng = np.random.Generator(np.random.PCG64(seeds))
            self._order = (epoch, rng.permutation(self.samples))
        return self._order[1]

    def next(self) -> Batch:
        ids, epochs = [], []
        for _ in range(self.batch):
            epoch, k = divmod(self.position, self.samples)
            ids.append(int(self.order(epoch)[k]))
            epochs.append(epoch)
            self.position += 1
        return Batch(torch.stack([self.sample(i) for i in ids]), tuple(ids), tuple(epochs))

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> Batch:
        return self.next()

    @property
    def epoch(self) -> int:
        return self.position // self.samples

    def state(self) -> dict[str, int]:
        """The cursor and what it depends on, JSON-ready (for a checkpoint)."""
        return {"position": self.position, "seed": self.seed, "stream": self.stream,
                "samples": self.samples, "batch": self.batch, "seq": self.seq}

    def load_state(self, state: dict[str, int]) -> None:
        """Continue from a saved cursor; it must come from the same data, seed and shapes."""
        mine = self.state()
        diff = [k for k in ("seed", "stream", "samples", "batch", "seq") if int(state[k]) != mine[k]]
        if diff:
            raise ValueError(f"cursor from other data or settings: {', '.join(diff)} differ "
                             f"(saved {state}, here {mine})")
        self.position = int(state["position"])
