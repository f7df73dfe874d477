"""``testbed run SUITE [--out DIR] [--resume] [--only FILTER] [--set KEY=VALUE ...]``."""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from testbed.experiments.points import Point
from testbed.experiments.runner import run_suite
from testbed.spec.suite import load_suite


def default_out(suite_name: str) -> Path:
    return Path("results") / suite_name


def run(args: argparse.Namespace) -> int:
    """CLI handler: run the suite with one progress display (point, repeat, ETA)."""
    suite = load_suite(args.suite, getattr(args, "set", None) or [])
    out = Path(args.out) if args.out else default_out(suite.name)
    console = Console(stderr=True)
    failed: list[str] = []
    with Progress(
        TextColumn("[bold]{task.fields[suite]}[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    ) as progress:
        task = progress.add_task("preparing", total=None, suite=suite.name)

        def on_start(n: int) -> None:
            progress.update(task, total=n, completed=0, description="")

        def on_task(point: Point, repeat: int, rec: dict | None) -> None:
            label = f"{point.id} (repeat {repeat + 1}/{suite.repeats})"
            if rec is None:
                progress.update(task, description=label)
                return
            if rec["status"] != "ok":
                failed.append(f"{label}: {rec['error']}")
                first = rec["error"].splitlines()[0][:200]
                progress.console.print(f"[red]failed[/] {escape(label)}: {escape(first)}")
            elif "caching" in rec:
                m = rec["metrics"]
                progress.console.print(
                    f"[green]ok[/] {escape(label)}: hit ratio {m['hit_ratio']:.3f}, "
                    f"backhaul {m['backhaul_bytes'] / 1e6:.1f} MB, TTFT p50 {m['ttft_ms_p50']} ms "
                    f"({rec['duration_s']:.1f} s)")
            elif "training" in rec:
                m = rec["metrics"]
                progress.console.print(
                    f"[green]ok[/] {escape(label)}: step {m['step_ms_mean']:.0f} ms "
                    f"(predicted {m['predicted_step_ms']}), "
                    f"loss {m['loss_first']:.3f} -> {m['loss_last']:.3f}, "
                    f"ppl {m['eval_ppl_before']} -> {m['eval_ppl_after']} ({rec['duration_s']:.0f} s)")
            else:
                m = rec["metrics"]
                lat = m["token_latency_ms"]["mean"]
                progress.console.print(
                    f"[green]ok[/] {escape(label)}: TTFT {m['ttft_ms']:.0f} ms, "
                    f"per token {lat if lat is None else round(lat, 1)} ms, "
                    f"up {m['bytes_up_per_token']} B/token ({rec['duration_s']:.0f} s)")
            progress.advance(task)

        def on_warning(line: str) -> None:
            # one line each, never wrapped: FILE:LINE stays whole for a reader or a grep
            progress.console.print(f"[yellow]warning[/] {escape(line)}", highlight=False, soft_wrap=True)

        results = run_suite(suite, out, resume=args.resume, only=args.only, on_start=on_start,
                            on_task=on_task, on_warning=on_warning)
    console.print(f"results: {results}" + (f"  ({len(failed)} failed)" if failed else ""), soft_wrap=True)
    console.print(f"report:  testbed report {out}", soft_wrap=True)
    return 1 if failed else 0
