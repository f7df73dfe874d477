"""``testbed validate`` and ``testbed trace-gen``."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from testbed.spec.errors import SpecError
from testbed.spec.synthetic import GilbertElliott, write_trace
from testbed.spec.topology import ROLES, Topology, load_topology
from testbed.spec.traces import Trace, load_trace


def summary(topo: Topology) -> str:
    """One line: name, node counts per role, links, traces, congestion control, security if on."""
    roles = Counter(n.role for n in topo.nodes.values())
    parts = ", ".join(f"{roles[r]} {r}" for r in ROLES if roles[r])
    traces = len(topo.traces())
    extra = f", {traces} trace{'s' if traces != 1 else ''}" if traces else ""
    links = len(topo.links)
    return (f"{topo.source}: OK: {topo.name}: {len(topo.nodes)} nodes ({parts}), "
            f"{links} link{'s' if links != 1 else ''}{extra}, tcp_cc {topo.tcp_cc}"
            + (f", security {topo.security}" if topo.security != "none" else ""))


def trace_summary(trace: Trace) -> str:
    """One line: format, period, opportunities, mean rate."""
    return (f"{trace.path}: OK: {trace.format} trace, period {trace.period_ms / 1000:g} s, "
            f"{trace.packets_per_period} delivery opportunities, mean {trace.mean_mbit():.2f} Mbit/s")


def validate(args: argparse.Namespace) -> int:
    """Check a topology file (or, for a non-YAML file, a trace); print a one-line summary or JSON."""
    if Path(args.topo).suffix.lower() not in (".yaml", ".yml"):
        trace = load_trace(Path(args.topo))
        if args.json:
            print(json.dumps({"path": str(trace.path), "format": trace.format, "period_ms": trace.period_ms,
                              "opportunities": trace.packets_per_period, "mean_mbit": trace.mean_mbit(),
                              "steps": len(trace.steps)}))
        else:
            print(trace_summary(trace))
        return 0
    topo = load_topology(args.topo)
    if args.json:
        print(json.dumps(topo.to_dict(), indent=2))
    else:
        print(summary(topo))
    return 0


def model_from_args(args: argparse.Namespace) -> GilbertElliott:
    """Build the channel model from the trace-gen flags (each flag's own range is checked by the parser)."""
    bin_ms = getattr(args, "bin_ms", 100.0)
    if bin_ms > args.seconds * 1000:
        raise SpecError("trace-gen", "--bin-ms", f"must be <= --seconds x 1000 ({args.seconds * 1000:g}) "
                                                 f"(got {bin_ms:g})")
    kw = {}
    for flag in ("good_delay_ms", "bad_delay_ms", "good_loss_pct", "bad_loss_pct"):
        v = getattr(args, flag, None)
        if v is None:
            continue
        if args.format != "csv":
            raise SpecError("trace-gen", "--" + flag.replace("_", "-"),
                            f"only the csv format carries delay/loss (got {v:g})")
        kw[flag] = v
    return GilbertElliott(good_mbit=args.good_mbit, bad_mbit=args.bad_mbit, p_good_bad=args.p_good_bad,
                          p_bad_good=args.p_bad_good, bin_ms=bin_ms, **kw)


def trace_gen(args: argparse.Namespace) -> int:
    """Write a Gilbert-Elliott trace and print what it holds."""
    model = model_from_args(args)
    out = Path(args.out)
    try:
        rates = write_trace(out, model, args.seconds, args.seed, args.format)
    except OSError as e:
        raise SpecError("trace-gen", "OUT", f"cannot write {out} ({e.strerror})") from None
    trace = load_trace(out, args.format)
    good = float((rates == model.good_mbit).mean()) if model.good_mbit != model.bad_mbit else 1.0
    print(f"wrote {out}: {args.format}, {trace.period_ms / 1000:g} s, mean {trace.mean_mbit():.2f} Mbit/s "
          f"(good {model.good_mbit:g} / bad {model.bad_mbit:g} Mbit/s, {good:.0%} of bins good; "
          f"long-run mean {model.stationary_mean_mbit():.2f}), seed {args.seed}")
    return 0
