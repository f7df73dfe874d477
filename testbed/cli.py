"""The ``testbed`` command line.  Each subcommand dispatches to the module that owns it."""

from __future__ import annotations

import argparse
import importlib
import sys

from testbed.spec.errors import SpecError

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
    "run": "testbed.experiments.commands:run",
    "report": "testbed.report.commands:report",
    "images": "testbed.hosts.images:images",
}

SHAPERS = ("auto", "kernel", "userspace")
QUANTS = ("none", "bf16", "int8", "int4")
CODECS = ("fp32", "fp16", "bf16", "int8")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--quant", choices=QUANTS, default="none")
    p.add_argument("--codec", choices=CODECS, default="fp32")
    p.add_argument("--no-kv-cache", action="store_true",
                   help="resend and recompute the whole sequence each step")
    p.add_argument("--model", default=None, help="checkpoint directory or GGUF file (default: SmolLM2-135M)")
    p.add_argument("--json", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="testbed", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check a topology file (or a trace file)")
    p.add_argument("topo", help="topology YAML; any other file is checked as a channel trace")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("trace-gen", help="write a synthetic channel trace (Gilbert-Elliott / Markov)")
    p.add_argument("out")
    p.add_argument("--format", choices=("mahimahi", "csv"), default="mahimahi")
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--good-mbit", type=float, default=20)
    p.add_argument("--bad-mbit", type=float, default=2)
    p.add_argument("--p-good-bad", type=float, default=0.05, help="per-100ms transition probability")
    p.add_argument("--p-bad-good", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--bin-ms", type=float, default=100.0, help="state duration; probabilities are per bin")
    for state in ("good", "bad"):
        p.add_argument(f"--{state}-delay-ms", type=float, default=None, help="csv only")
        p.add_argument(f"--{state}-loss-pct", type=float, default=None, help="csv only")

    p = sub.add_parser("up", help="bring a topology up and open a CLI")
    p.add_argument("topo")
    p.add_argument("--shaper", choices=SHAPERS, default="auto")
    p.add_argument("--runtime", choices=("process", "docker"), default=None)
    p.add_argument("--no-cli", action="store_true", help="hold the topology until interrupted")

    p = sub.add_parser("probe", help="measure throughput, RTT and loss between two nodes")
    p.add_argument("topo")
    p.add_argument("--src", required=True)
    p.add_argument("--dst", required=True)
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--shaper", choices=SHAPERS, default="auto")
    p.add_argument("--runtime", choices=("process", "docker"), default=None)
    p.add_argument("--timeline", action="store_true", help="saturating UDP flow, per-second received Mbit/s")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("clean", help="remove leftovers of crashed runs (runs whose owner has died)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--all", action="store_true", help="also stop and remove live runs (any owner)")
    p.add_argument("--dead-only", action="store_true", help="the default; kept for old scripts")

    p = sub.add_parser("demo", help="the main job on the embedded default")
    p.add_argument("--topo", default="topologies/device-edge-cloud.yaml")
    p.add_argument("--shaper", choices=SHAPERS, default="auto")

    p = sub.add_parser("generate", help="run all shards in one process (the reference)")
    _model_args(p)
    p.add_argument("--cuts", default="", help="comma-separated cut layers, e.g. 8,20")

    p = sub.add_parser("quant-eval", help="agreement and speed of a quantized model vs fp32")
    p.add_argument("--quant", choices=QUANTS, required=True)
    p.add_argument("--text", default=None)
    p.add_argument("--cuts", default="")
    p.add_argument("--model", default=None)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("infer", help="split inference across the emulated network")
    p.add_argument("topo")
    p.add_argument("--placement", required=True, help="node=start:end,... e.g. phone=0:8,mec=8:30")
    p.add_argument("--shaper", choices=SHAPERS, default="auto")
    p.add_argument("--runtime", choices=("process", "docker"), default=None)
    p.add_argument("--logs", default=None, metavar="DIR",
                   help="folder for the node programs' logs (default: results/logs/infer-DATE-TIME-PID)")
    _model_args(p)

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
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module, func = HANDLERS[args.command].split(":")
    try:
        handler = getattr(importlib.import_module(module), func)
        return int(handler(args) or 0)
    except SpecError as e:
        print(str(e), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
