"""The testbed's errors: each prints as one line and carries the exit code ``testbed`` returns for it.

* :class:`TestbedError` -- a command could not do its job (a probe tool failed, a node died, an image
  did not build); exit code 1.  Error classes of the other packages derive from it.
* :class:`SpecError` -- bad input (a file, a flag, a ``--set`` override); it reads
  ``FILE: path.to.field: what is wrong (got VALUE)``; exit code 2.

The exit codes themselves are listed in ``EXIT_CODES`` and in the README's "Command line" section.
"""

from __future__ import annotations

from pathlib import Path

EXIT_OK = 0
EXIT_FAILED = 1  # the command ran and failed (TestbedError, a refused system call)
EXIT_BAD_INPUT = 2  # SpecError: a file, flag or override is wrong; nothing was started
EXIT_INTERNAL = 3  # an unexpected exception (a bug): one line, TESTBED_DEBUG=1 shows the traceback
EXIT_INTERRUPTED = 130  # Ctrl-C / SIGINT (128 + 2)
EXIT_PIPE_CLOSED = 141  # the reader of stdout went away (``| head``), as a process killed by SIGPIPE

EXIT_CODES: dict[int, str] = {
    EXIT_OK: "success",
    EXIT_FAILED: "the command ran and failed (probe, node program, run with failed points, system call)",
    EXIT_BAD_INPUT: "bad input: a file, flag, --set override or model folder; a missing prerequisite",
    EXIT_INTERNAL: "unexpected error (a bug): one line; TESTBED_DEBUG=1 shows the traceback",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
    EXIT_PIPE_CLOSED: "stdout closed by its reader (e.g. | head); output stops there",
}


class TestbedError(Exception):
    """A command failed: ``str(e)`` is the line shown to the user, ``exit_code`` what ``testbed`` returns."""

    __test__ = False  # not a pytest test class, despite its name
    exit_code = EXIT_FAILED


class SpecError(TestbedError):
    """Bad input in a topology, suite, trace or prompt file, a command-line flag or a ``--set`` override."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, file: str | Path, field: str, message: str) -> None:
        self.file = str(file)
        self.field = field
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        # one line even when a bad key or path holds a line break (it is shown escaped)
        text = f"{self.file}: {self.field}: {self.message}"
        return text.replace("\r", "\\r").replace("\n", "\\n")


def got(value: object) -> str:
    """``(got VALUE)`` with strings quoted, so the bad value is visible."""
    return f"(got {value!r})" if isinstance(value, str) else f"(got {value})"
