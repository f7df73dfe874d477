"""The ``testbed`` command line.  Each subcommand dispatches to the module that owns it.

Every error reaches the user as one line on stderr, with the exit codes of ``testbed.spec.errors``:
bad input (a file, a flag, a ``--set``) is ``FILE: field: problem (got value)`` and exit 2; a command
that fails (a probe tool, a node, an image build) prints ``COMMAND: what failed`` and exits 1.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import select
import sys
from typing import NoReturn

from testbed.apps.caching import limits as cache_limits
from testbed.apps.training.arguments import add_arguments as train_arguments
from testbed.spec import check
from testbed.spec.check import flag_choice, flag_number
from testbed.spec.errors import (
    EXIT_FAILED,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    EXIT_PIPE_CLOSED,
    SpecError,
    TestbedError,
)
from testbed.spec.options import (
    CACHE_POLICIES,
    CATALOGUE_BASES,
    CODECS,
    QUANTS,
    RUNTIMES,
    SHAPERS,
    TRACE_FORMATS,
)
from testbed.spec.traces import TRACE_BW_MBIT

# subcommand -> "module:function"; the function takes the parsed args and returns an exit code.
HANDLERS = {
    "validate": "testbed.spec.commands:validate",
    "trace-gen": "testbed.spec.commands:trace_gen",
    "up": "testbed.net.commands:up",
    "probe": "testbed.net.commands:probe",
    "clean": "testbed.net.commands:clean",
    "demo": "testbed.demo:demo",
    "generate": "testbed.model.commands:generate",
    "quant-eval": "testbed.model.commands:quant_eval",
    "infer": "testbed.apps.inference.run:infer",
    "train": "testbed.apps.training.run:train",
    "run": "testbed.experiments.commands:run",
    "report": "testbed.report.commands:report",
    "images": "testbed.hosts.images:images",
    "catalogue": "testbed.apps.caching.commands:catalogue",
    "cache-run": "testbed.apps.caching.commands:cache_run",
    "serve-bench": "testbed.apps.caching.serving:serve_bench",
}
DEBUG_ENV = "TESTBED_DEBUG"  # set to 1: full error text and tracebacks


class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one SpecError line ``COMMAND: --flag: problem`` (exit 2)."""

    def error(self, message: str) -> NoReturn:
        raise usage_error(self.prog, message)


def usage_error(prog: str, message: str) -> SpecError:
    """An argparse message as ``COMMAND: FIELD: problem``; COMMAND is the subcommand (``infer``)."""
    command = prog.removeprefix("testbed").strip() or "testbed"
    hint = "(see testbed --help)" if command == "testbed" else f"(see testbed {command} --help)"
    m = re.fullmatch(r"argument ([^:]+): (.*)", message, re.S)
    if m:
        field, problem = m.group(1).split("/")[-1], m.group(2)
        choice = re.fullmatch(r"invalid choice: (.*?) \(choose from (.*)\)", problem, re.S)
        if choice:
            names = ", ".join(c.strip().strip("'\"") for c in choice.group(2).split(","))
            problem = f"must be one of {names} (got {choice.group(1)})"
        elif problem.startswith("expected"):
            problem = f"{problem} {hint}"
        return SpecError(command, field, problem)
    m = re.fullmatch(r"the following arguments are required: (.*)", message, re.S)
    if m:
        if m.group(1) == "command":
            return SpecError(command, "command", f"missing: one of {', '.join(HANDLERS)} {hint}")
        return SpecError(command, m.group(1), f"required {hint}")
    m = re.fullmatch(r"unrecognized arguments: (.*)", message, re.S)
    if m:
        return SpecError(command, m.group(1), f"unknown argument {hint}")
    return SpecError(command, "arguments", f"{message} {hint}")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=flag_number(check.MAX_NEW_TOKENS), default=32)
    p.add_argument("--quant", type=flag_choice(QUANTS), choices=QUANTS, default="none")
    p.add_argument("--codec", type=flag_choice(CODECS), choices=CODECS, default="fp32")
    p.add_argument("--no-kv-cache", action="store_true",
                   help="resend and recompute the whole sequence each step")
    p.add_argument("--model", default=None, help="checkpoint directory or GGUF file (default: SmolLM2-135M)")
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="a peft LoRA folder (testbed train's adapters/), merged into each shard's layers")
    p.add_argument("--json", action="store_true")


def _network_args(p: argparse.ArgumentParser, runtime: bool = True) -> None:
    p.add_argument("--shaper", type=flag_choice(SHAPERS), choices=SHAPERS, default="auto")
    if runtime:
        p.add_argument("--runtime", type=flag_choice(RUNTIMES), choices=RUNTIMES, default=None)


def build_parser() -> argparse.ArgumentParser:
    ap = Parser(prog="testbed", description=__doc__.split("\n", 1)[0],
                epilog="exit codes: 0 ok, 1 failed, 2 bad input, 3 internal error, 130 interrupted, "
                       "141 stdout closed")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a topology file (or a trace file)")
    p.add_argument("topo", help="topology YAML; any other file is checked as a channel trace")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("trace-gen", help="write a synthetic channel trace (Gilbert-Elliott / Markov)")
    p.add_argument("out")
    p.add_argument("--format", type=flag_choice(TRACE_FORMATS), choices=TRACE_FORMATS, default="mahimahi")
    p.add_argument("--seconds", type=flag_number(check.SECONDS), default=60.0)
    p.add_argument("--good-mbit", type=flag_number(check.BW_MBIT), default=20.0)
    p.add_argument("--bad-mbit", type=flag_number(TRACE_BW_MBIT), default=2.0)
    p.add_argument("--p-good-bad", type=flag_number(check.PROBABILITY), default=0.05,
                   help="per-bin transition probability")
    p.add_argument("--p-bad-good", type=flag_number(check.PROBABILITY), default=0.2)
    p.add_argument("--seed", type=flag_number(check.SEED), default=1)
    p.add_argument("--bin-ms", type=flag_number(check.BIN_MS), default=100.0,
                   help="state duration; probabilities are per bin")
    for state in ("good", "bad"):
        p.add_argument(f"--{state}-delay-ms", type=flag_number(check.DELAY_MS), default=None, help="csv only")
        p.add_argument(f"--{state}-loss-pct", type=flag_number(check.LOSS_PCT), default=None, help="csv only")

    p = sub.add_parser("up", help="bring a topology up and open a CLI")
    p.add_argument("topo")
    _network_args(p)
    p.add_argument("--no-cli", action="store_true", help="hold the topology until interrupted")

    p = sub.add_parser("probe", help="measure throughput, RTT and loss between two nodes")
    p.add_argument("topo")
    p.add_argument("--src", required=True)
    p.add_argument("--dst", required=True)
    p.add_argument("--seconds", type=flag_number(check.SECONDS), default=5.0)
    _network_args(p)
    p.add_argument("--timeline", action="store_true", help="saturating UDP flow, per-second received Mbit/s")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("clean", help="remove leftovers of crashed runs (runs whose owner has died)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--all", action="store_true", help="also stop and remove live runs (any owner)")
    p.add_argument("--dead-only", action="store_true", help="the default; kept for old scripts")

    p = sub.add_parser("demo", help="the main job on the embedded default")
    p.add_argument("--topo", default="topologies/device-edge-cloud.yaml")
    _network_args(p, runtime=False)

    p = sub.add_parser("generate", help="run all shards in one process (the reference)")
    _model_args(p)
    p.add_argument("--cuts", default="", help="comma-separated cut layers, e.g. 8,20")

    p = sub.add_parser("quant-eval", help="agreement and speed of a quantized model vs fp32")
    p.add_argument("--quant", type=flag_choice(QUANTS), choices=QUANTS, required=True)
    p.add_argument("--text", default=None)
    p.add_argument("--cuts", default="")
    p.add_argument("--model", default=None)
    p.add_argument("--max-tokens", type=flag_number(check.EVAL_TOKENS), default=None)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("infer", help="split inference across the emulated network")
    p.add_argument("topo")
    p.add_argument("--placement", required=True, help="node=start:end,... e.g. phone=0:8,mec=8:30")
    _network_args(p)
    p.add_argument("--logs", default=None, metavar="DIR",
                   help="folder for the node programs' logs (default: results/logs/infer-DATE-TIME-PID)")
    p.add_argument("--events", default=None, metavar="FILE",
                   help="link changes, outages, kills applied during the run (README: Events)")
    _model_args(p)

    p = sub.add_parser("train", help="split LoRA fine-tuning across the emulated network")
    train_arguments(p)
    _network_args(p)

    p = sub.add_parser("run", help="run an experiment suite")
    p.add_argument("suite")
    p.add_argument("--out", default=None)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--only", default=None, help="comma-separated: key=value or a substring of the point id")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a suite field, e.g. model=tiny or sweep.uplink_mbit=[2,20]")

    p = sub.add_parser("report", help="plots and a summary table for a results directory")
    p.add_argument("dir")

    p = sub.add_parser("images", help="build the node container image offline")
    p.add_argument("--force", action="store_true")

    _caching_parsers(sub)

    p = sub.add_parser("serve-bench", help="LoRA serving at an edge: tokens/s vs distinct adapters per batch")
    count = flag_number(check.Range(ge=1, le=256, integer=True))
    p.add_argument("--adapters", type=count, default=8)
    p.add_argument("--batch", type=count, default=8)
    p.add_argument("--rank", type=count, default=8)
    p.add_argument("--tokens", type=count, default=16, help="new tokens per request")
    p.add_argument("--repeats", type=count, default=3)
    p.add_argument("--threads", type=count, default=None)
    p.add_argument("--seed", type=int, default=1)
    backends = ("stacked", "peft")  # testbed.apps.caching.serving.BACKENDS (not imported: torch)
    p.add_argument("--backend", type=flag_choice(backends), choices=backends, default="stacked")
    p.add_argument("--model", default=None, help="checkpoint directory or GGUF file (default: SmolLM2-135M)")
    p.add_argument("--json", action="store_true")
    return ap


def _caching_parsers(sub) -> None:
    p = sub.add_parser("catalogue", help="the model catalogue for edge caching (content-addressed blocks)")
    acts = p.add_subparsers(dest="action", required=True)
    b = acts.add_parser("build", help="base, its int4 form, generated LoRA adapters and partial fine-tunes")
    b.add_argument("--out", required=True)
    b.add_argument("--adapters", type=flag_number(cache_limits.VARIANTS), default=8)
    b.add_argument("--partial", type=flag_number(cache_limits.VARIANTS), default=2,
                   help="number of partial fine-tunes")
    b.add_argument("--shared-layers", type=flag_number(cache_limits.SHARED_LAYERS), default=None,
                   help="bottom layers each partial fine-tune shares with the base (default: drawn each)")
    b.add_argument("--base", type=flag_choice(CATALOGUE_BASES), choices=CATALOGUE_BASES, default="smollm2")
    b.add_argument("--seed", type=flag_number(check.SEED), default=1)
    b.add_argument("--json", action="store_true")
    c = acts.add_parser("check", help="check a catalogue's manifests and blocks")
    c.add_argument("dir")
    c.add_argument("--verify", action="store_true", help="also hash every block")
    c.add_argument("--json", action="store_true")

    p = sub.add_parser("cache-run", help="edge model caching: a policy on a seeded workload")
    p.add_argument("topo")
    p.add_argument("--catalogue", required=True)
    p.add_argument("--policy", type=flag_choice(CACHE_POLICIES), choices=CACHE_POLICIES, required=True)
    p.add_argument("--capacity-mb", type=flag_number(cache_limits.CAPACITY_MB), required=True,
                   help="each edge's store, in MB (10^6 bytes)")
    p.add_argument("--zipf", type=flag_number(cache_limits.ZIPF), default=0.8)
    p.add_argument("--requests", type=flag_number(cache_limits.REQUESTS), default=300)
    p.add_argument("--mobility", type=flag_number(check.PROBABILITY), default=0.0,
                   help="probability that a device hands over to another cell after a request")
    p.add_argument("--seed", type=flag_number(check.SEED), default=1)
    p.add_argument("--window", type=flag_number(cache_limits.WINDOW), default=200,
                   help="requests between proactive placements (trimcaching, optimal)")
    p.add_argument("--replay", action="store_true",
                   help="analytic delivery times instead of the emulated network")
    _network_args(p)
    p.add_argument("--json", action="store_true")


def _debug() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _say(text: str, code: int) -> int:
    """Print an error as one line on stderr (the rest with TESTBED_DEBUG=1); return ``code``."""
    lines = [ln for ln in str(text).strip().splitlines() if ln.strip()] or ["(no message)"]
    line = lines[0]
    if len(lines) > 1 and _debug():
        line += "\n" + "\n".join(lines[1:])
    elif len(lines) > 1:
        line += f" ({DEBUG_ENV}=1 shows {len(lines) - 1} more lines)"
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:  # stderr gone as well: the exit code is all that is left
        pass
    return code


def _stdout_closed() -> bool:
    """True if stdout is a pipe whose reader went away (``testbed ... | head``), not some other pipe."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (OSError, ValueError):
        return False


def _silence_stdout() -> None:
    """Point stdout at /dev/null so that the interpreter's last flush does not report the closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    command = "testbed"
    try:
        args = build_parser().parse_args(argv)
        command = args.command
        module, func = HANDLERS[command].split(":")
        handler = getattr(importlib.import_module(module), func)
        code = int(handler(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, inside the handlers below, not at exit
        return code
    except SpecError as e:
        return _say(str(e), e.exit_code)
    except TestbedError as e:
        return _say(f"{command}: {e}", e.exit_code)
    except KeyboardInterrupt:
        return _say(f"{command}: interrupted", EXIT_INTERRUPTED)
    except BrokenPipeError as e:
        if _stdout_closed():
            _silence_stdout()
            return EXIT_PIPE_CLOSED
        return _say(f"{command}: {e}", EXIT_FAILED)
    except OSError as e:  # a system call refused: permissions, a missing tool, a full disk
        if _debug():
            raise
        return _say(f"{command}: {e.__class__.__name__}: {e}", EXIT_FAILED)
    except Exception as e:  # noqa: BLE001 - a bug: still one line, the traceback on request
        if _debug():
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        return _say(f"{command}: internal error: {e.__class__.__name__}: {first} "
                    f"({DEBUG_ENV}=1 shows the traceback)", EXIT_INTERNAL)


if __name__ == "__main__":
    sys.exit(main())
