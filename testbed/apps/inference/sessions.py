"""Run one experiment point on a live network: shared shard nodes, one driver per device.

Built from the split runtime's pieces (``testbed.apps.inference.run``): the shard
nodes of the downstream stages start once and serve every device's session;
each device runs its own driver (its own first shard) at the same time.  Besides
the drivers' results this measures the CPU time of every shard node while the
workload ran (``/proc/PID/stat`` after the ready line and before the stop; for the
drivers, sampled every 50 ms, from the sample before generation started) and
the moment generation started relative to the network coming up (for trace
timelines).  Drivers start while the shard nodes load; each waits for its next hop
before it starts timing, so start-up overlaps but no measurement includes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from testbed.apps.inference.placement import Stage
from testbed.apps.inference.run import (
    BASE_PORT,
    InferenceError,
    driver_argv,
    node_env,
    shard_argv,
    stop_all,
    wait_ready,
)

CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass
class Request:
    prompt: str
    max_new_tokens: int
    quant: str = "none"
    codec: str = "fp32"
    kv_cache: bool = True
    timeout_s: float = 600.0


def cpu_ms(pid: int) -> float | None:
    """utime + stime of a process, in ms (None once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) * 1000.0 / CLK_TCK


class _CpuSampler(threading.Thread):
    """Samples the CPU time of each process every ``period_s`` (drivers exit on their own)."""

    def __init__(self, pids: dict[str, int], period_s: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pids, self.period_s = pids, period_s
        self.samples: dict[str, list[tuple[float, float]]] = {name: [] for name in pids}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.period_s):
            for name, pid in self.pids.items():
                v = cpu_ms(pid)
                if v is not None:
                    self.samples[name].append((time.monotonic(), v))

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive():
            self.join()

    def since(self, name: str, t: float) -> float | None:
        """CPU ms used from time ``t`` (the last sample at or before it) to the last sample."""
        s = self.samples.get(name) or []
        if not s:
            return None
        before = [v for ts, v in s if ts <= t]
        return round(s[-1][1] - (before[-1] if before else s[0][1]), 1)


def run_sessions(net, chains: list[list[Stage]], model_dir: Path, req: Request,
                 net_started: float) -> dict[str, Any]:
    """Run one request per chain at the same time; chains share every stage after the first.

    ``net_started``: ``time.monotonic()`` when the network came up.  Returns
    ``{"sessions": [driver result + gen_start_s, ...], "cpu_ms": {node: ms}, "wall_s": s}``.
    """
    downstream = chains[0][1:]
    for c in chains[1:]:
        if c[1:] != downstream:
            raise ValueError("parallel devices must share the downstream stages")
    env = node_env()
    procs: list[subprocess.Popen] = []
    sampler: _CpuSampler | None = None
    with tempfile.TemporaryDirectory(prefix="testbed-run-") as tmp:
        logs = Path(tmp)
        try:
            # The first downstream stage listens on the address facing the first device.
            addrs: list[str | None] = [None]
            for i, s in enumerate(downstream, start=1):
                prev = chains[0][i - 1].node
                addrs.append(f"tcp://{net.ip(s.node, prev)}:{BASE_PORT + i}")
            if downstream and len({net.ip(downstream[0].node, c[0].node) for c in chains}) > 1:
                raise InferenceError(f"the devices reach {downstream[0].node} on different addresses: "
                                     "parallel devices must share one segment (a cell)")
            started = []
            for i in range(len(downstream), 0, -1):
                st = downstream[i - 1]
                nxt = addrs[i + 1] if i + 1 < len(addrs) else None
                with open(logs / f"{st.node}.log", "wb") as err:
                    p = net.popen(st.node, shard_argv(addrs[i], model_dir, st, nxt, req.quant),
                                  stdout=subprocess.PIPE, stderr=err, env=env)
                procs.append(p)
                started.append((st.node, p))
            first_addr = addrs[1] if downstream else None
            drivers = []
            t_start = time.monotonic()
            for chain in chains:
                argv = driver_argv(model_dir, chain, first_addr, req.prompt, req.max_new_tokens, req.quant,
                                   req.codec, req.kv_cache)
                d = net.popen(chain[0].node, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
                procs.append(d)
                drivers.append((chain[0].node, d))
            sampler = _CpuSampler({dev: d.pid for dev, d in drivers})
            sampler.start()
            # Drivers start together with the shard nodes (both import torch and load weights); a
            # driver waits for its next hop (PING/PONG) before it starts timing.
            try:
                wait_ready(started)
            except InferenceError as e:
                tails = "\n".join(f"[{n}] {_tail(logs / f'{n}.log')}" for n, _ in started)
                raise InferenceError(f"{e}\n{tails}") from None
            shard_cpu = {n: cpu_ms(p.pid) or 0.0 for n, p in started}
            outs: list[Any] = [None] * len(drivers)

            def collect(i: int) -> None:
                try:
                    outs[i] = _collect(*drivers[i], req.timeout_s)
                except Exception as e:  # noqa: BLE001 - re-raised below in the caller's thread
                    outs[i] = e

            threads = [threading.Thread(target=collect, args=(i,), daemon=True) for i in range(len(drivers))]
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                for t in threads:
                    t.join(timeout=0.2)
                for n, node in started:  # a node that dies mid-run fails the point now, not at a timeout
                    if node.poll() is not None:
                        raise InferenceError(f"shard node on {n} exited with {node.returncode} during "
                                             f"the run\n{_tail(logs / f'{n}.log')}")
            sampler.stop()
            t_end = time.monotonic()
            for o in outs:
                if isinstance(o, BaseException):
                    raise o
            cpu = {n: round((cpu_ms(p.pid) or shard_cpu[n]) - shard_cpu[n], 1) for n, p in started}
            results = []
            for (dev, _), (res, t_exit) in zip(drivers, outs, strict=True):
                t_gen = t_exit - res.get("total_ms", 0.0) / 1e3
                res["gen_start_s"] = round(t_gen - net_started, 3)
                results.append(res)
                cpu.setdefault(dev, sampler.since(dev, t_gen))
            return {"sessions": results, "cpu_ms": cpu, "wall_s": round(t_end - t_start, 3)}
        finally:
            if sampler is not None:
                sampler.stop()
            stop_all(procs)


def _collect(dev: str, d: subprocess.Popen, timeout_s: float) -> tuple[dict[str, Any], float]:
    try:
        out, err = d.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise InferenceError(f"driver on {dev} did not finish in {timeout_s:.0f} s") from None
    t_exit = time.monotonic()
    lines = [ln for ln in out.decode(errors="replace").splitlines() if ln.startswith("{")]
    if not lines:
        tail = err.decode(errors="replace")[-1500:]
        raise InferenceError(f"driver on {dev} failed ({d.returncode}): {tail}")
    res = json.loads(lines[-1])
    if "error" in res:
        raise InferenceError(f"split inference on {dev} failed: {res['error']}")
    return res, t_exit


def _tail(path: Path, n: int = 1500) -> str:
    with contextlib.suppress(OSError):
        return path.read_text(errors="replace")[-n:].strip()
    return ""
