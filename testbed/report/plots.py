"""PNG plots of a results directory.  Each function returns the file it wrote, or None when the
suite did not vary what the plot needs."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from testbed.report.data import SPREAD, Row, Spread  # noqa: E402
from testbed.spec.suite import NETWORK_PARAMS  # noqa: E402

BASELINE_STYLE = {"on-device": ("tab:red", "--"), "edge-offload": ("tab:blue", "-."),
                  "cloud-offload": ("tab:purple", ":")}
SPLIT_COLORS = ("tab:green", "tab:orange", "tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray",
                "black")


def _plain_log(ax, x: bool = True, y: bool = True) -> None:
    """Log axes labelled with plain numbers (2, 10, 50) instead of powers of ten."""
    fmt = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    for on, axis in ((x, ax.xaxis), (y, ax.yaxis)):
        if on:
            axis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            axis.set_major_formatter(fmt)
            axis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def crossing(xs: np.ndarray, ys: np.ndarray, ref: np.ndarray) -> list[float]:
    """Uplink bandwidths where a line crosses a reference (interpolated on a log bandwidth axis)."""
    out = []
    d = ys - ref
    for i in range(len(xs) - 1):
        if np.isnan(d[i]) or np.isnan(d[i + 1]) or (d[i] < 0) == (d[i + 1] < 0):
            continue
        f = d[i] / (d[i] - d[i + 1])
        out.append(float(np.exp(np.log(xs[i]) + f * (np.log(xs[i + 1]) - np.log(xs[i])))))
    return out


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _color(name: str, i: int) -> tuple[str, str]:
    """(color, line style): fixed ones for the baselines, a palette without their colors otherwise."""
    return BASELINE_STYLE.get(name, (SPLIT_COLORS[i % len(SPLIT_COLORS)], "-"))


def _style(row: Row, i: int) -> dict[str, Any]:
    color, ls = _color(row.placement_name, i)
    return {"color": color, "linestyle": ls, "marker": "o"}


def _errorbar(ax, pts: list[tuple[float, Spread]], **kw: Any) -> None:
    """A line through the medians with a bar over each point's range (min-max over repeats)."""
    xs = [x for x, _ in pts]
    ys = [s.median for _, s in pts]
    yerr = np.array([[s.median - s.lo for _, s in pts], [s.hi - s.median for _, s in pts]])
    ax.errorbar(xs, ys, yerr=yerr, capsize=3, elinewidth=1, **kw)


def _overlap(a: Spread, b: Spread) -> bool:
    return a.n > 1 and b.n > 1 and a.lo <= b.hi and b.lo <= a.hi


def crossovers(rows: list[Row], y: tuple[str, ...] = ("token_latency_ms", "mean"),
               x_key: str = "uplink_mbit") -> list[str]:
    """Sentences: at which uplink bandwidths each split line beats each baseline (metric ``y``).

    Lines compare medians over repeats; where the two ranges (min-max) overlap the sentence says
    so, since there the repeats do not tell the two apart.
    """
    lines = _lines(rows, x_key, y)
    constant = {r.label(): r.spread(*y) for r in rows if x_key not in r.params and r.ok}
    out = []
    for lab, (row, pts) in lines.items():
        if row.kind != "split" or len(pts) < 2:
            continue
        xs = np.array([p[0] for p in pts])
        rivals: dict[str, list[Spread | None]] = {
            name: [v] * len(xs) for name, v in constant.items() if v is not None}
        for other, (orow, opts) in lines.items():
            if orow.kind != "split":
                d = dict(opts)
                rivals[other] = [d.get(x) for x in xs]
        for name, ref in rivals.items():
            keep = [i for i, r in enumerate(ref) if r is not None]
            if not keep:
                continue
            x = xs[keep]
            wins = np.array([pts[i][1].median < ref[i].median for i in keep])  # type: ignore[union-attr]
            tied = [f"{xs[i]:g}" for i in keep if _overlap(pts[i][1], ref[i])]  # type: ignore[arg-type]
            span = f"{x.min():g}-{x.max():g} Mbit/s"
            if wins.all():
                line = f"**{lab}** beats {name} at every uplink bandwidth tried ({span})"
            elif not wins.any():
                line = f"**{lab}** never beats {name} ({span})"
            else:
                flips = [i for i in range(len(x) - 1) if wins[i] != wins[i + 1]]
                if len(flips) == 1:
                    i = flips[0]
                    side = "above" if wins[-1] else "below"
                    line = (f"**{lab}** beats {name} {side} a crossover between {x[i]:g} and "
                            f"{x[i + 1]:g} Mbit/s")
                else:  # no single crossover: the two are close, say where each won
                    won = ", ".join(f"{v:g}" for v in x[wins])
                    lost = ", ".join(f"{v:g}" for v in x[~wins])
                    line = (f"**{lab}** and {name} alternate: {lab} faster at {won} Mbit/s, "
                            f"slower at {lost} Mbit/s")
            if tied:
                line += f" (medians; the ranges over repeats overlap at {', '.join(tied)} Mbit/s)"
            out.append(line)
    return out


def _lines(rows: list[Row], x_key: str, y: tuple[str, ...] = ("token_latency_ms", "mean")
           ) -> dict[str, tuple[Row, list[tuple[float, Spread]]]]:
    groups: dict[str, tuple[Row, list[tuple[float, Spread]]]] = {}
    for r in rows:
        if x_key not in r.params or not r.ok:
            continue
        v = r.spread(*y)
        if v is None:
            continue
        lab = r.label(skip=(x_key,))
        groups.setdefault(lab, (r, []))[1].append((float(r.params[x_key]), v))
    return {k: (r, sorted(p, key=lambda xv: xv[0])) for k, (r, p) in groups.items()}



def _swept(rows: list[Row], key: str) -> bool:
    """Whether the suite swept ``key`` (a figure over it is drawn only then)."""
    return any(key in r.records[0].get("swept", []) for r in rows)


def latency_vs_uplink(rows: list[Row], out: Path) -> Path | None:
    """Per-token latency and TTFT vs uplink bandwidth, one line per placement (the headline plot)."""
    if not _swept(rows, "uplink_mbit"):
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, y, title in ((axes[0], ("token_latency_ms", "mean"), "per-token latency (decode, mean)"),
                         (axes[1], ("ttft_ms",), "time to first token")):
        lines = _lines(rows, "uplink_mbit", y)
        xs_all = sorted({x for _, pts in lines.values() for x, _ in pts}) or [1.0]
        for i, (lab, (row, pts)) in enumerate(lines.items()):
            _errorbar(ax, pts, label=lab, **_style(row, i))
        for r in rows:  # placements that do not use the network: constant lines, their range shaded
            sp = r.spread(*y) if "uplink_mbit" not in r.params and r.ok else None
            if sp is None:
                continue
            color, ls = BASELINE_STYLE.get(r.placement_name, ("black", "--"))
            ax.hlines(sp.median, xs_all[0], xs_all[-1], colors=color, linestyles=ls,
                      label=f"{r.label()} (no network)")
            if sp.hi > sp.lo:
                ax.fill_between(xs_all, sp.lo, sp.hi, color=color, alpha=0.12, linewidth=0)
            crossed = []
            for _lab, (row, pts) in lines.items():  # where a split line crosses on-device
                if row.kind == "split":
                    xs = np.array([p[0] for p in pts])
                    ys = np.array([p[1].median for p in pts])
                    crossed += crossing(xs, ys, np.full(len(xs), sp.median))
            if crossed:
                ax.plot(crossed, [sp.median] * len(crossed), linestyle="none", marker="X", markersize=10,
                        color="black", label=f"a split line crosses {r.placement_name}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        _plain_log(ax)
        ax.set_xlabel("uplink bandwidth (Mbit/s)")
        ax.set_ylabel(f"{title.split(' (')[0]} (ms)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize=8)
    fig.suptitle(f"Latency vs uplink bandwidth per placement (lower is better; {SPREAD})")
    fig.tight_layout(rect=(0, 0.08 + 0.035 * (1 + len(labels) // 4), 1, 1))
    fig.savefig(out / "latency_vs_uplink.png", dpi=110)
    plt.close(fig)
    return out / "latency_vs_uplink.png"


def bytes_per_token(rows: list[Row], out: Path) -> Path | None:
    """Uplink payload per token position sent (codec x hidden for activations, 8 B for token ids)."""
    ok = [r for r in rows if r.ok and r.kind != "on-device"]
    if not ok:
        return None
    by: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in ok:
        codec = r.params.get("codec", "token ids")
        lab = r.label(skip=("codec", "prompt", "kv_cache", "devices", *NETWORK_PARAMS))
        by[lab][codec].extend(r.values("payload_up_per_position"))
    if not by:
        return None
    codecs = sorted({c for d in by.values() for c in d})
    colors = {c: f"C{i}" for i, c in enumerate(codecs)}
    labels = list(by)
    fig, ax = plt.subplots(figsize=(max(6.5, 1.3 * len(labels) + 2), 4.8))
    width = 0.8 / max(1, max(len(d) for d in by.values()))
    drawn: set[str] = set()
    for i, lab in enumerate(labels):
        present = [c for c in codecs if by[lab].get(c)]
        for j, c in enumerate(present):
            x = i + (j - (len(present) - 1) / 2) * width
            sp = Spread.of(by[lab][c])
            assert sp is not None  # present: at least one value
            bar = ax.bar(x, sp.median, width, color=colors[c], label=c if c not in drawn else None,
                         yerr=[[sp.median - sp.lo], [sp.hi - sp.median]], capsize=3 if sp.hi > sp.lo else 0)
            drawn.add(c)
            ax.bar_label(bar, fmt="%.0f", fontsize=7)
    ax.set_xticks(np.arange(len(labels)), labels, rotation=20, ha="right")
    ax.set_ylabel("uplink payload per token position (B)")
    ax.set_yscale("log")
    _plain_log(ax, x=False)
    ax.set_title("Bytes per token on the device's uplink, by placement and codec\n(activations: "
                 "codec x hidden size; offload: int64 token ids; headers excluded; median, "
                 "min-max over points and repeats)", fontsize=10)
    ax.legend(title="codec")
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, out / "bytes_per_token.png")


def kv_cache(rows: list[Row], out: Path) -> Path | None:
    """KV cache on vs off: per-token latency, uplink bytes and KV memory vs prompt length."""
    if not _swept(rows, "kv_cache"):
        return None
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.8))
    groups: dict[str, list[tuple[float, Row]]] = defaultdict(list)
    for r in rows:
        prompt_tokens = r.median("prompt_tokens") if r.ok else None
        if prompt_tokens is not None:
            groups[r.label(skip=("prompt",))].append((prompt_tokens, r))
    zero = Spread(0.0, 0.0, 0.0, 0)
    for i, (lab, pts) in enumerate(groups.items()):
        pts.sort(key=lambda p: p[0])
        ls = "-" if pts[0][1].params.get("kv_cache", True) else "--"
        color = _color(pts[0][1].placement_name, i // 2)[0]
        kw = {"label": lab, "linestyle": ls, "marker": "o", "color": color}
        _errorbar(axes[0], [(x, r.spread("token_latency_ms", "mean") or zero) for x, r in pts], **kw)
        _errorbar(axes[1], [(x, (r.spread("bytes_up_per_token") or zero).scaled(1e-3)) for x, r in pts], **kw)
        _errorbar(axes[2], [(x, (r.kv_bytes(device_only=True) or zero).scaled(2**-20)) for x, r in pts], **kw)
    for ax, ylab, title in ((axes[0], "per-token latency (ms)", "compute + communication"),
                            (axes[1], "bytes up per generated token (kB)", "communication"),
                            (axes[2], "KV cache held on the device (MiB)", "memory on the device")):
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel(ylab)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    axes[0].set_yscale("log")
    _plain_log(axes[0], x=False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.suptitle(f"KV cache on (solid) vs off (dashed): communication and compute vs memory; {SPREAD}")
    fig.tight_layout(rect=(0, 0.06 + 0.04 * (1 + len(labels) // 4), 1, 0.95))
    fig.savefig(out / "kv_cache.png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return out / "kv_cache.png"


def _trace_of(rec: dict[str, Any], device: str) -> tuple[Path | None, Path | None]:
    for link in rec.get("topology", {}).get("links", []):
        a, b = link["between"]
        if device in (a, b):
            up, down = (link["up"], link["down"]) if a == device else (link["down"], link["up"])
            return (Path(up["trace"]) if up.get("trace") else None,
                    Path(down["trace"]) if down.get("trace") else None)
    return None, None


def trace_timeline(rows: list[Row], out: Path) -> Path | None:
    """Per-token latency over time during trace replay, with the trace's capacity beneath."""
    from testbed.spec.traces import load_trace

    traced = [r for r in rows if r.ok and "trace" in r.params]
    if not traced:
        return None
    recs = [r.ok[0] for r in traced]
    fig, (ax, cap) = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
    t_max, t_min = 0.0, float("inf")
    for i, row in enumerate(traced):
        color, ls = _color(row.placement_name, i)
        n = len(row.ok)
        for k, rec in enumerate(row.ok):  # every repeat: the first solid, the others fainter
            raw = rec["sessions"][0]["raw"]
            t0 = float(raw.get("gen_start_s") or 0.0)
            t_min = min(t_min, t0)
            times = t0 + np.cumsum(raw["token_ms"]) / 1e3
            t_max = max(t_max, float(times[-1]))
            label = row.label() + (f" ({n} repeats)" if n > 1 else "")
            ax.plot(times, raw["token_ms"], marker=".", color=color, linestyle=ls,
                    alpha=1.0 if k == 0 else 0.4, label=label if k == 0 else None)
    up, down = _trace_of(recs[0], recs[0]["sessions"][0]["device"])
    bins = np.arange(0.0, t_max + 1.0, 0.1)
    for path, lab, color in ((up, "uplink", "tab:green"), (down, "downlink", "tab:orange")):
        if path is None:
            continue
        if not path.is_file():  # results copied from another machine: draw what the record holds
            cap.plot([], [], color=color, label=f"{lab} capacity: {path} not found here")
            continue
        tr = load_trace(path)
        rates = tr.rate_bins_mbit(100.0)
        idx = (np.arange(len(bins)) % len(rates))
        cap.step(bins, rates[idx], where="post", color=color, label=f"{lab} capacity ({path.name})")
    ax.set_yscale("log")
    _plain_log(ax, x=False)
    ax.set_ylabel("per-token latency (ms)")
    ax.set_title("Per-token latency while the access link replays a trace")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    cap.set_xlim(max(0.0, t_min - 1.0), t_max + 1.0)  # the generation window, not the start-up
    cap.set_xlabel("time since the network (and the trace replay) started (s)")
    cap.set_ylabel("trace capacity (Mbit/s)")
    cap.grid(True, alpha=0.3)
    cap.legend(fontsize=8)
    return _save(fig, out / "trace_timeline.png")


EVENT_COLORS = {"change": "tab:blue", "outage": "tab:red", "handover": "tab:purple", "kill": "black",
                "restart": "tab:green"}


def _event_text(ev: dict[str, Any]) -> str:
    """A short label: ``outage phone-mec 3 s``, ``up bw_mbit=1``, ``kill mec``."""
    kind = ev.get("kind", "?")
    if kind == "outage":
        return f"outage {'-'.join(ev.get('link', []))} {ev.get('down_for_s', 0):g} s"
    if kind == "change":
        sides = [f"{side} " + ",".join(f"{k}={v:g}" for k, v in ev[side].items())
                 for side in ("up", "down") if isinstance(ev.get(side), dict)]
        return f"{'-'.join(ev.get('link', []))}: " + "; ".join(sides)
    if kind == "handover":
        return f"handover {ev.get('handover')} {ev.get('from')}->{ev.get('to')}"
    return f"{kind} {ev.get(kind, '')}"


def _token_times(rec: dict[str, Any]) -> list[tuple[np.ndarray, list[float]]]:
    """(end time of each token on the events' clock, its latency) per request of the first session."""
    raw = rec["sessions"][0]["raw"]
    t0 = float(rec.get("events_t0_s") or 0.0)
    reqs = raw.get("requests") or [{"gen_start_s": raw.get("gen_start_s") or 0.0,
                                    "token_ms": raw["token_ms"]}]
    return [(float(r["gen_start_s"]) - t0 + np.cumsum(r["token_ms"]) / 1e3, list(r["token_ms"]))
            for r in reqs if r.get("token_ms")]


def events_timeline(rows: list[Row], out: Path) -> Path | None:
    """Per-token latency over time with the run's events marked: one panel per point that had
    events (its first successful repeat), time since generation began (the events' clock)."""
    marked = [r for r in rows if any(rec.get("events") for rec in r.ok)]
    if not marked:
        return None
    fig, axes = plt.subplots(len(marked), 1, figsize=(11, 2.2 + 2.3 * len(marked)), sharex=True,
                             squeeze=False)
    t_max = 1.0
    for ax, row in zip(axes[:, 0], marked, strict=True):
        rec = next(rec for rec in row.ok if rec.get("events"))
        for k, (times, ms) in enumerate(_token_times(rec)):
            # a step: each token's latency held over the time it was pending (a stall spans its outage)
            ax.step(times, ms, where="pre", marker=".", color="tab:gray",
                    label="per-token latency" if k == 0 else None)
            t_max = max(t_max, float(times[-1]))
        for ev in rec["events"]:
            if "skipped" in ev:
                continue
            color = EVENT_COLORS.get(ev.get("kind"), "tab:gray")
            at = float(ev.get("actual_s", ev.get("at_s", 0.0)))
            text = _event_text(ev) + (" (failed)" if "error" in ev else "")
            if ev.get("kind") == "outage":
                end = float(ev.get("actual_end_s", ev.get("end_s", at)))
                ax.axvspan(at, end, color=color, alpha=0.15, label=text)
                t_max = max(t_max, end)
            else:
                ax.axvline(at, color=color, linestyle="--", label=text)
            t_max = max(t_max, at)
        ax.set_yscale("log")
        _plain_log(ax, x=False)
        ax.set_ylabel("ms per token")
        ax.set_title(row.label(), fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    axes[-1, 0].set_xlim(-0.5, t_max + 0.5)
    axes[-1, 0].set_xlabel("time since generation began (s); events at the time they were applied")
    fig.suptitle("Per-token latency with the run's events")
    return _save(fig, out / "events_timeline.png")


def measured_vs_predicted(rows: list[Row], out: Path, band: tuple[float, float]) -> Path | None:
    """Measured vs analytically predicted end-to-end latency per point, with the accepted band."""
    pts = []
    for r in rows:
        for rec in r.ok:
            for s in rec["sessions"]:
                m = s["metrics"]
                if m["predicted"]["e2e_ms"]:
                    pts.append((m["predicted"]["e2e_ms"], m["e2e_ms"], r))
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(7, 6))
    seen = set()
    for pred, meas, r in pts:
        lab = r.placement_name if r.placement_name not in seen else None
        seen.add(r.placement_name)
        ax.scatter(pred, meas, color=_color(r.placement_name, 0)[0], label=lab, zorder=3)
    lo = min(min(p[0], p[1]) for p in pts) * 0.7
    hi = max(max(p[0], p[1]) for p in pts) * 1.4
    xs = np.array([lo, hi])
    ax.plot(xs, xs, color="black", linewidth=1, label="measured = predicted")
    ax.fill_between(xs, xs * band[0], xs * band[1], color="grey", alpha=0.2,
                    label=f"accepted band x{band[0]:g}-x{band[1]:g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    _plain_log(ax)
    ax.set_xlabel("predicted end-to-end latency (ms): compute + bytes/bandwidth + delay")
    ax.set_ylabel("measured end-to-end latency (ms)")
    ax.set_title("Measured vs analytic prediction")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out / "measured_vs_predicted.png")


def devices(rows: list[Row], out: Path) -> Path | None:
    """Per-token latency and aggregate tokens/s vs the number of parallel devices."""
    if not _swept(rows, "devices"):
        return None
    panels = ((("token_latency_ms", "mean"), "per-token latency, all devices (mean, ms)"),
              (("tokens_per_s",), "aggregate tokens/s, all devices"))
    fig, axes = plt.subplots(1, len(panels), figsize=(11, 4.5))
    for ax, (y, ylab) in zip(axes, panels, strict=True):
        counts: set[float] = set()
        for i, (lab, (row, p)) in enumerate(_lines(rows, "devices", y).items()):
            _errorbar(ax, p, label=lab, **_style(row, i))
            counts.update(x for x, _ in p)
        ax.set_xticks(sorted(counts))
        ax.set_xlabel("devices sharing the edge")
        ax.set_ylabel(ylab)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Devices in parallel on one cell and one edge server; {SPREAD}")
    return _save(fig, out / "devices.png")
