"""The body of every ``fuzz_NAME.py``: instrument the testbed's modules, then run atheris on one target.

``python bench/fuzz/fuzz_NAME.py [CORPUS_DIR ...] [-atheris_runs=N] [other libFuzzer flags]``.  With no
corpus folder, a new scratch folder collects what the run finds and the target's seed corpus in
``tests/`` is read (libFuzzer adds new inputs to the first folder given: never name the seeds first).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import atheris

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE)]

# what is imported inside this block is instrumented: the testbed's modules (not torch, numpy, yaml)
with atheris.instrument_imports(include=["testbed"]):
    import targets

    targets.preload()

SEEDS = {"wire": "tests/wire/fuzz_corpus", "topology": "tests/spec/fuzz_corpus/topology",
         "suite": "tests/spec/fuzz_corpus/suite", "trace": "tests/spec/fuzz_corpus/trace",
         "events": "tests/spec/fuzz_corpus/events"}


def main(name: str) -> None:
    argv = list(sys.argv)
    if not any(a.startswith("-artifact_prefix=") for a in argv):  # crash reproducers: not in the cwd
        argv.insert(1, f"-artifact_prefix={tempfile.mkdtemp(prefix=f'fuzz-{name}-crashes-')}/")
    if not any(not a.startswith("-") for a in argv[1:]):
        argv += [tempfile.mkdtemp(prefix=f"fuzz-{name}-corpus-"), str(HERE.parents[1] / SEEDS[name])]
    atheris.Setup(argv, targets.checked(name))
    atheris.Fuzz()
