"""The device side of split inference: run the first shard locally, send the rest down the chain.

``SplitClient.generate`` runs greedy decoding, measures TTFT/TPOT and every
step's latency, and folds the hop records of the replies into per-hop totals
(compute, codec, transfer time and bytes in each direction of each link).
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

import torch
import zmq

from testbed.spec.errors import TestbedError
from testbed.wire.message import (
    HEADER,
    Hop,
    Kind,
    WireError,
    control,
    forward_hidden,
    forward_tokens,
    parse,
    wire_size,
)


class SplitError(TestbedError, RuntimeError):
    """A shard node answered with an error or did not answer in time."""


@dataclass
class HopTotals:
    layers: str
    compute_ms: float = 0.0
    codec_ms: float = 0.0
    transfer_ms: float = 0.0  # link into this hop, both directions, minus the hop's own service time
    bytes_up: int = 0  # link into this hop, towards it
    bytes_down: int = 0  # link into this hop, back upstream
    payload_up: int = 0  # activation bytes only (bytes_up without the header frames)

    def add(self, compute_ms: float, codec_ms: float, transfer_ms: float, up: int, down: int) -> None:
        self.compute_ms += compute_ms
        self.codec_ms += codec_ms
        self.transfer_ms += transfer_ms
        self.bytes_up += up
        self.bytes_down += down
        self.payload_up += max(0, up - HEADER.size)

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        for k in ("compute_ms", "codec_ms", "transfer_ms"):
            d[k] = round(d[k], 3)
        return d


@dataclass
class SplitClient:
    """Talks to the second hop at ``next_addr``; ``first`` holds this device's layers."""

    first: object
    next_addr: str | None
    codec: str = "fp32"
    kv_cache: bool = True
    timeout_s: float = 300.0
    layers: list[str] = field(default_factory=list)  # "S:E" of every hop, the device's first
    ctx: zmq.Context | None = None

    def __post_init__(self) -> None:
        self.session = secrets.randbits(63) or 1
        self.sock: zmq.Socket | None = None
        if self.next_addr:
            self.ctx = self.ctx or zmq.Context.instance()
            self.sock = self.ctx.socket(zmq.DEALER)
            self.sock.setsockopt(zmq.LINGER, 0)
            self.sock.connect(self.next_addr)
        elif self.first is None or not self.first.is_last:
            raise ValueError("the device's shard is not the last one: a next hop is required")
        if not self.layers:
            self.layers = [f"{self.first.start}:{self.first.end}" if self.first else "0:0"]
        self.totals = [HopTotals(x) for x in self.layers]

    def _recv(self) -> list:
        assert self.sock is not None
        if not self.sock.poll(int(self.timeout_s * 1000)):
            raise SplitError(f"no reply from {self.next_addr} within {self.timeout_s:.0f} s")
        return self.sock.recv_multipart(copy=False)

    def step(self, step: int, ids: torch.Tensor, pos: int, cache: object) -> int:
        """One forward pass of the whole chain; returns the greedy next token id."""
        t0 = time.perf_counter()
        if self.first is None:  # no layer on the device: upload the token ids
            t1 = t0
            frames = forward_tokens(self.session, step, pos, ids, self.kv_cache).frames()
        else:
            with torch.inference_mode():
                out = self.first.forward(ids, cache, pos)
            t1 = time.perf_counter()
            if self.sock is None:
                self.totals[0].add((t1 - t0) * 1e3, 0.0, 0.0, 0, 0)
                return int(out[0, -1].argmax())
            frames = forward_hidden(self.session, step, pos, out, self.codec, self.kv_cache).frames()
        compute_ms = (t1 - t0) * 1e3
        t2 = time.perf_counter()
        self.sock.send_multipart(frames, copy=False)
        while True:
            reply = self._recv()
            t3 = time.perf_counter()
            try:
                msg = parse(reply)
            except WireError as e:
                raise SplitError(f"malformed reply: {e}") from None
            if msg.session == self.session and msg.step == step and msg.kind in (Kind.RESULT, Kind.ERROR):
                break
        if msg.kind == Kind.ERROR:
            raise SplitError(msg.text())
        me = Hop(compute_ms, (t2 - t1) * 1e3, (t3 - t0) * 1e3, (t3 - t2) * 1e3, 0, wire_size(reply))
        hops = [me, *msg.hops]
        if len(hops) != len(self.totals):
            raise SplitError(f"reply carries {len(hops) - 1} hop records, expected {len(self.totals) - 1}")
        self.totals[0].add(me.compute_ms, me.codec_ms, 0.0, 0, 0)
        for i in range(1, len(hops)):
            up, prev = hops[i], hops[i - 1]
            self.totals[i].add(up.compute_ms, up.codec_ms, max(0.0, prev.downstream_ms - up.service_ms),
                               up.bytes_in, prev.bytes_reply_in)
        return int(msg.tensor().reshape(-1)[0])

    def generate(self, prompt_ids: torch.Tensor, max_new_tokens: int, stop_ids: set[int]) -> dict:
        """Greedy decoding; stops after ``max_new_tokens`` or at a stop token (which is kept)."""
        ids = prompt_ids.reshape(1, -1).to(torch.int64)
        cache = self.first.new_cache() if self.kv_cache and self.first is not None else None
        tokens: list[int] = []
        step_ms: list[float] = []
        t_start = time.perf_counter()
        for step in range(max_new_tokens):
            t0 = time.perf_counter()
            if self.kv_cache:
                x, pos = (ids if step == 0 else ids[:, -1:]), (0 if step == 0 else ids.shape[1] - 1)
                tok = self.step(step, x, pos, cache)
            else:
                tok = self.step(step, ids, 0, None)
            step_ms.append((time.perf_counter() - t0) * 1e3)
            tokens.append(tok)
            ids = torch.cat([ids, torch.tensor([[tok]], dtype=torch.int64)], dim=1)
            if tok in stop_ids:
                break
        total_ms = (time.perf_counter() - t_start) * 1e3
        ttft = step_ms[0] if step_ms else 0.0
        tpot = sum(step_ms[1:]) / (len(step_ms) - 1) if len(step_ms) > 1 else 0.0
        return {
            "tokens": tokens,
            "prompt_tokens": int(prompt_ids.numel()),
            "ttft_ms": round(ttft, 3),
            "tpot_ms": round(tpot, 3),
            "total_ms": round(total_ms, 3),
            "token_ms": [round(x, 3) for x in step_ms],
            "bytes_up": self.totals[1].bytes_up if len(self.totals) > 1 else 0,
            "bytes_down": self.totals[1].bytes_down if len(self.totals) > 1 else 0,
            "per_hop": [t.to_dict() for t in self.totals],
        }

    def connect(self) -> None:
        """Wait for the connection to the next hop (one PING/PONG), so TTFT excludes its set-up."""
        if self.sock is None:
            return
        self.sock.send_multipart(control(Kind.PING, self.session).frames())
        while True:
            try:
                msg = parse(self._recv())
            except WireError as e:
                raise SplitError(f"malformed reply: {e}") from None
            if msg.kind == Kind.PONG:
                return

    def close(self) -> None:
        """Free this session's KV caches along the chain, then the socket."""
        if self.sock is None:
            return
        try:
            self.sock.send_multipart(control(Kind.CLOSE, self.session).frames())
            self.sock.poll(1000)
        finally:
            self.sock.close(0)
            self.sock = None
