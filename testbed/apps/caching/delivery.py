"""Model-block delivery over ZeroMQ: chunked, credit-based flow control, resumable, verified.

The receiver pulls (the idea of the ZeroMQ guide's file-transfer chapter): it keeps up to
``credit`` chunk requests outstanding and sends a new one for each chunk that arrives, so the
sender never pushes more than the receiver asked for and the pipe stays full when
``credit x chunk`` covers the link's bandwidth-delay product (``credit_for``).

* **Verified.**  A block is named by the SHA-256 of its bytes.  The receiver first asks for the
  SHA-256 of each chunk (``META``); a chunk whose digest does not match is asked for again and
  never written; the whole block is checked against its name before ``write_block`` sees it.
* **Resumable.**  Chunks are requested by offset.  After a link outage TCP carries on; requests
  a restarted sender lost are noticed in order (the sender answers requests in the order they
  came, so a reply to a later request means every earlier unanswered one is gone) or, when
  nothing comes back at all, by a timeout that probes with the oldest request.  With
  ``partial_dir`` verified chunks are kept on disk, so a restarted receiver asks only for the
  chunks it does not have; nothing verified is fetched again.

The sender takes ``read_block(hexdigest) -> bytes | None`` and the receiver
``write_block(hexdigest, data)``: neither knows how a store keeps its blocks.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import zmq

from testbed.wire import blockxfer as bx
from testbed.wire.payload import WireError

DEFAULT_CHUNK = 128 * 1024
ReadBlock = Callable[[str], "bytes | None"]
WriteBlock = Callable[[str, bytes], None]


class DeliveryError(RuntimeError):
    """A fetch that cannot complete: the sender lacks the block, corrupts it, or stays silent."""


def credit_for(rate_mbit: float | None, rtt_ms: float | None, chunk_bytes: int = DEFAULT_CHUNK,
               factor: float = 4.0, floor: int = 4, cap: int = 4096) -> int:
    """Outstanding chunk requests that keep a ``rate_mbit`` link with ``rtt_ms`` busy.

    ``factor`` x the bandwidth-delay product: one BDP keeps the link busy only if the two
    user-space ends answered at once; the slack covers their scheduling delays on a busy host
    (``bench/delivery_goodput.py``: at 50 Mbit/s and 40 ms, 2x reached 61 % of the rate, 4x and
    8x 70 % on a machine with load 14, where iperf3 reached 97 %), while a window beyond the link's
    queue would only add drops."""
    if not rate_mbit or rtt_ms is None:
        return floor
    bdp = rate_mbit * 1e6 / 8 * rtt_ms / 1e3
    return max(floor, min(cap, math.ceil(factor * bdp / chunk_bytes)))


def transfer_bound_s(nbytes: int, rate_mbit: float, rtt_ms: float, rounds: int = 2) -> float:
    """Analytic lower bound of a fetch: the bytes at the link rate plus ``rounds`` round trips
    (chunk digests, then the first chunk)."""
    return nbytes * 8 / (rate_mbit * 1e6) + rounds * rtt_ms / 1e3


def sha256(data: bytes | bytearray | memoryview) -> bytes:
    return hashlib.sha256(data).digest()


def chunk_digests(data: bytes, chunk_bytes: int) -> bytes:
    view = memoryview(data)
    return b"".join(sha256(view[o:o + chunk_bytes]) for o in range(0, len(data), chunk_bytes))


def _digest(hexdigest: str) -> bytes:
    try:
        raw = bytes.fromhex(hexdigest)
    except ValueError:
        raw = b""
    if len(raw) != bx.DIGEST_BYTES:
        raise ValueError(f"block name {hexdigest!r} is not a hex SHA-256")
    return raw


# ---- sender --------------------------------------------------------------------------------


@dataclass
class ServerStats:
    requests: int = 0
    meta_sent: int = 0
    chunks_sent: int = 0
    chunk_bytes_sent: int = 0
    missing: int = 0
    bad_requests: int = 0


class BlockServer:
    """Answers block requests on a ROUTER socket from one thread (``start``/``stop`` or ``serve``)."""

    def __init__(self, bind: str, read_block: ReadBlock, *, ctx: zmq.Context | None = None,
                 cache_blocks: int = 4) -> None:
        self.read_block = read_block
        self.ctx = ctx or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        for attempt in range(40):
            try:
                self.sock.bind(bind)
                break
            except zmq.ZMQError as e:
                # a restarted sender: the old socket's port is freed by ZeroMQ's I/O thread, a moment late
                if e.errno != zmq.EADDRINUSE or attempt == 39:
                    self.sock.close(linger=0)
                    raise
                time.sleep(0.05)
        self.endpoint: str = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.stats = ServerStats()
        self._blocks: OrderedDict[bytes, bytes | None] = OrderedDict()  # recently read blocks
        self._digests: dict[tuple[bytes, int], bytes] = {}
        self._cache_blocks = cache_blocks
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # what a chunk carries on the wire; a test's own sender overrides this to corrupt one
    def chunk_payload(self, hexdigest: str, offset: int, data: memoryview) -> bytes | memoryview:
        return data

    def _block(self, digest: bytes) -> bytes | None:
        if digest in self._blocks:
            self._blocks.move_to_end(digest)
            return self._blocks[digest]
        data = self.read_block(digest.hex())
        if data is not None and sha256(data) != digest:
            raise DeliveryError(f"block {digest.hex()[:12]} held here does not match its hash")
        self._blocks[digest] = data
        while len(self._blocks) > self._cache_blocks:
            old, _ = self._blocks.popitem(last=False)
            for key in [k for k in self._digests if k[0] == old]:
                del self._digests[key]
        return data

    def handle(self, frames: Sequence[bytes]) -> list[bytes | memoryview]:
        """The reply frames to one request's frames (the identity frame excluded)."""
        self.stats.requests += 1
        try:
            msg = bx.parse(frames)
        except WireError as e:
            self.stats.bad_requests += 1
            return bx.error(bytes(bx.DIGEST_BYTES), f"bad request: {e}").frames()
        reply = self._reply(msg)
        reply.seq = msg.seq
        return reply.frames()

    def _reply(self, msg: bx.BlockMessage) -> bx.BlockMessage:
        if msg.kind not in (bx.Kind.META_REQ, bx.Kind.CHUNK_REQ):
            self.stats.bad_requests += 1
            return bx.error(msg.digest, f"{msg.kind.name} is not a request")
        try:
            data = self._block(msg.digest)
        except DeliveryError as e:
            return bx.error(msg.digest, str(e))
        if data is None:
            self.stats.missing += 1
            return bx.missing(msg.digest)
        if msg.kind == bx.Kind.META_REQ:
            key = (msg.digest, msg.chunk_bytes)
            if key not in self._digests:
                self._digests[key] = chunk_digests(data, msg.chunk_bytes)
            self.stats.meta_sent += 1
            return bx.meta(msg.digest, len(data), msg.chunk_bytes, self._digests[key])
        if msg.offset >= len(data):
            return bx.error(msg.digest, f"offset {msg.offset} beyond the block's {len(data)} bytes")
        view = memoryview(data)[msg.offset:msg.offset + min(msg.length, msg.chunk_bytes)]
        self.stats.chunks_sent += 1
        self.stats.chunk_bytes_sent += view.nbytes
        payload = self.chunk_payload(msg.hexdigest, msg.offset, view)
        return bx.chunk(msg.digest, msg.offset, len(data), msg.chunk_bytes, payload)

    def serve(self, stop: threading.Event | None = None, poll_ms: int = 100) -> None:
        """Answer requests until ``stop`` is set (this object's own event by default)."""
        stop = stop or self._stop
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        while not stop.is_set():
            if not poller.poll(poll_ms):
                continue
            frames = self.sock.recv_multipart(copy=True)
            if len(frames) < 2:
                continue
            self.sock.send_multipart([frames[0], *self.handle(frames[1:])], copy=False)

    def start(self) -> BlockServer:
        if self._thread is not None:
            return self
        self._thread = threading.Thread(target=self.serve, name="block-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.sock.close(linger=0)

    def __enter__(self) -> BlockServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---- receiver ------------------------------------------------------------------------------


@dataclass
class FetchReport:
    """One fetch of one or more blocks: what moved, how fast, against the analytic bound."""

    blocks: int = 0
    bytes: int = 0  # bytes of the blocks delivered
    resumed_bytes: int = 0  # of which verified chunks already on disk (not fetched again)
    wire_chunk_bytes: int = 0  # chunk payload bytes received, duplicates and corrupt ones included
    elapsed_s: float = 0.0
    goodput_mbit: float = 0.0  # (bytes - resumed_bytes) over elapsed_s
    bound_s: float | None = None  # transfer_bound_s of the fetched bytes, when the link is known
    bound_ratio: float | None = None  # bound_s / elapsed_s (1.0 = the bound)
    chunk_bytes: int = DEFAULT_CHUNK
    credit: int = 0
    chunks: int = 0  # chunks verified and kept
    corrupt_chunks: int = 0  # failed their digest: asked for again, never written
    rerequested: int = 0  # requests sent again (lost to a restarted sender, or timeout probes)
    duplicates: int = 0  # replies to requests already answered (dropped)
    timeouts: int = 0
    per_block: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class _Block:
    def __init__(self, hexdigest: str) -> None:
        self.hex = hexdigest
        self.digest = _digest(hexdigest)
        self.size: int | None = None
        self.digests = b""
        self.buf = bytearray()
        self.have = bytearray()
        self.remaining = 0
        self.failures = 0
        self.restarts = 0
        self.partial = None
        self.t0 = 0.0

    def chunk_ok(self, idx: int, data: bytes | memoryview) -> bool:
        return sha256(data) == self.digests[idx * bx.DIGEST_BYTES:(idx + 1) * bx.DIGEST_BYTES]


class BlockFetcher:
    """Fetches blocks from one ``BlockServer`` endpoint and hands each, verified, to ``write_block``.

    ``rate_mbit``/``rtt_ms`` describe the path (from the topology): they size the credit window
    (unless ``credit`` is given) and give each report its analytic bound."""

    def __init__(self, endpoint: str, write_block: WriteBlock, *, chunk_bytes: int = DEFAULT_CHUNK,
                 credit: int | None = None, rate_mbit: float | None = None, rtt_ms: float | None = None,
                 timeout_s: float | None = None, give_up_s: float = 60.0, max_corrupt: int = 8,
                 partial_dir: Path | None = None, ctx: zmq.Context | None = None,
                 on_chunk: Callable[[str, int, int], None] | None = None) -> None:
        if not bx.MIN_CHUNK <= chunk_bytes <= bx.MAX_CHUNK:
            raise ValueError(f"chunk size {chunk_bytes} outside [{bx.MIN_CHUNK}, {bx.MAX_CHUNK}]")
        self.write_block = write_block
        self.chunk_bytes = chunk_bytes
        self.rate_mbit, self.rtt_ms = rate_mbit, rtt_ms
        self.credit = credit or credit_for(rate_mbit, rtt_ms, chunk_bytes)
        self.timeout_s = timeout_s or max(1.0, 8 * (rtt_ms or 0) / 1e3)
        self.give_up_s = give_up_s
        self.max_corrupt = max_corrupt
        self.partial_dir = Path(partial_dir) if partial_dir is not None else None
        self.on_chunk = on_chunk
        self.ctx = ctx or zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        for opt, val in ((zmq.LINGER, 0), (zmq.SNDHWM, 0), (zmq.RCVHWM, 0),
                         (zmq.RECONNECT_IVL, 100), (zmq.RECONNECT_IVL_MAX, 1000)):
            self.sock.setsockopt(opt, val)
        self.sock.connect(endpoint)

    def close(self) -> None:
        self.sock.close(linger=0)

    def __enter__(self) -> BlockFetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- partial files: verified chunks survive a restarted receiver --

    def _partial_path(self, blk: _Block) -> Path | None:
        return self.partial_dir / f"{blk.hex}.part" if self.partial_dir is not None else None

    def _resume(self, blk: _Block) -> int:
        """Keep the chunks of an earlier partial file that match their digests; bytes kept."""
        path = self._partial_path(blk)
        if path is None:
            return 0
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = 0
        if path.exists() and path.stat().st_size == blk.size:
            old = path.read_bytes()
            view = memoryview(old)
            for idx in range(len(blk.have)):
                off = idx * self.chunk_bytes
                piece = view[off:off + self.chunk_bytes]
                if blk.chunk_ok(idx, piece):
                    blk.buf[off:off + len(piece)] = piece
                    blk.have[idx] = 1
                    blk.remaining -= 1
                    kept += len(piece)
        else:
            with open(path, "wb") as f:
                f.truncate(blk.size or 0)
        blk.partial = open(path, "r+b")  # noqa: SIM115 - open until the block completes
        return kept

    def _drop_partial(self, blk: _Block) -> None:
        if blk.partial is not None:
            blk.partial.close()
            blk.partial = None
        path = self._partial_path(blk)
        if path is not None:
            path.unlink(missing_ok=True)

    # -- the transfer --

    def fetch(self, hexdigests: Sequence[str]) -> FetchReport:
        """Fetch every block named (duplicates once); returns when all are written."""
        blocks: dict[bytes, _Block] = {}
        for h in hexdigests:
            blk = _Block(h.lower())
            blocks.setdefault(blk.digest, blk)
        rep = FetchReport(blocks=len(blocks), chunk_bytes=self.chunk_bytes, credit=self.credit)
        # (digest, chunk index or -1 for the digests) -> request number, in the order sent
        inflight: OrderedDict[tuple[bytes, int], int] = OrderedDict()
        queue: deque[tuple[bytes, int]] = deque((d, -1) for d in blocks)
        seq = probes = 0
        pending = len(blocks)
        t0 = time.monotonic()
        last_rx = last_progress = t0
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)

        def send(key: tuple[bytes, int]) -> None:
            nonlocal seq
            digest, idx = key
            if idx < 0:
                msg = bx.meta_request(digest, self.chunk_bytes)
            else:
                blk = blocks[digest]
                off = idx * self.chunk_bytes
                msg = bx.chunk_request(digest, off, min(self.chunk_bytes, blk.size - off), self.chunk_bytes)
            seq += 1
            msg.seq = seq
            inflight[key] = seq
            inflight.move_to_end(key)
            self.sock.send_multipart(msg.frames(), copy=False)

        def answered(key: tuple[bytes, int], mine: int) -> None:
            """The reply to request ``mine`` (for ``key``) came: take ``key`` off the in-flight list;
            requests sent before ``mine`` and still unanswered are lost (replies come in the order
            asked): queue them again.  A probe keeps its key in flight with the probe's number, so the
            reply to the original request loses nothing else."""
            inflight.pop(key, None)
            lost = []
            for k, s in inflight.items():
                if s >= mine:
                    break
                lost.append(k)
            for k in reversed(lost):
                del inflight[k]
                queue.appendleft(k)
                rep.rerequested += 1

        try:
            while pending:
                while queue and (len(inflight) < self.credit or queue[0][1] < 0):
                    key = queue.popleft()
                    blk = blocks[key[0]]
                    if key[1] >= 0 and blk.have[key[1]]:
                        continue
                    send(key)
                now = time.monotonic()
                patience = self.timeout_s * 2 ** min(probes, 4)  # back off while the link is down
                wait = max(0.0, last_rx + patience - now)
                if not poller.poll(int(wait * 1000) + 1):
                    now = time.monotonic()
                    if now - last_progress > self.give_up_s:
                        raise DeliveryError(f"no progress for {self.give_up_s:.0f} s "
                                            f"({pending} of {len(blocks)} blocks missing)")
                    if now - last_rx >= patience and inflight:
                        # nothing came back: probe with the oldest request (its reply, or the
                        # replies ahead of it, tell what was lost)
                        rep.timeouts += 1
                        rep.rerequested += 1
                        send(next(iter(inflight)))
                        probes += 1
                        last_rx = now
                    continue
                frames = self.sock.recv_multipart(copy=False)
                last_rx = time.monotonic()
                probes = 0
                try:
                    msg = bx.parse([f.buffer for f in frames])
                except WireError as e:
                    raise DeliveryError(f"bad reply from the sender: {e}") from None
                blk = blocks.get(msg.digest)
                if msg.kind == bx.Kind.ERROR:
                    raise DeliveryError(f"sender: {msg.text()}")
                if blk is None:
                    rep.duplicates += 1
                    continue
                if msg.kind == bx.Kind.MISSING:
                    raise DeliveryError(f"the sender holds no block {blk.hex}")
                if msg.kind == bx.Kind.META:
                    answered((msg.digest, -1), msg.seq)
                    if blk.size is not None:
                        rep.duplicates += 1
                        continue
                    if msg.chunk_bytes != self.chunk_bytes:
                        raise DeliveryError(f"digests for {msg.chunk_bytes}-byte chunks, "
                                            f"asked for {self.chunk_bytes}")
                    blk.size, blk.digests = msg.total, bytes(msg.payload)
                    blk.buf = bytearray(blk.size)
                    blk.have = bytearray(bx.n_chunks(blk.size, self.chunk_bytes))
                    blk.remaining = len(blk.have)
                    blk.t0 = time.monotonic()
                    kept = self._resume(blk)
                    rep.resumed_bytes += kept
                    queue.extend((blk.digest, i) for i in range(len(blk.have)) if not blk.have[i])
                    last_progress = time.monotonic()
                elif msg.kind == bx.Kind.CHUNK:
                    idx = msg.offset // self.chunk_bytes
                    rep.wire_chunk_bytes += msg.length
                    if blk.size is None or msg.total != blk.size or msg.chunk_bytes != self.chunk_bytes:
                        rep.duplicates += 1
                        continue
                    answered((msg.digest, idx), msg.seq)  # a late reply to a request thought lost counts
                    if blk.remaining < 0 or blk.have[idx]:
                        rep.duplicates += 1
                        continue
                    if not blk.chunk_ok(idx, msg.payload):
                        rep.corrupt_chunks += 1
                        blk.failures += 1
                        if blk.failures > self.max_corrupt:
                            raise DeliveryError(f"block {blk.hex[:12]}: {blk.failures} corrupt chunks")
                        queue.appendleft((blk.digest, idx))
                        continue
                    blk.buf[msg.offset:msg.offset + msg.length] = msg.payload
                    blk.have[idx] = 1
                    blk.remaining -= 1
                    rep.chunks += 1
                    last_progress = time.monotonic()
                    if blk.partial is not None:
                        blk.partial.seek(msg.offset)
                        blk.partial.write(msg.payload)
                    if self.on_chunk is not None:
                        self.on_chunk(blk.hex, idx, msg.length)
                if blk.size is not None and blk.remaining == 0:
                    pending -= self._finish(blk, rep, queue)
            rep.elapsed_s = time.monotonic() - t0
        finally:
            for blk in blocks.values():
                if blk.partial is not None:
                    blk.partial.close()
                    blk.partial = None
        fetched = rep.bytes - rep.resumed_bytes
        rep.goodput_mbit = fetched * 8 / rep.elapsed_s / 1e6 if rep.elapsed_s > 0 else 0.0
        if self.rate_mbit:
            rep.bound_s = transfer_bound_s(fetched, self.rate_mbit, self.rtt_ms or 0.0)
            rep.bound_ratio = rep.bound_s / rep.elapsed_s if rep.elapsed_s > 0 else None
        return rep

    def _finish(self, blk: _Block, rep: FetchReport, queue: deque) -> int:
        """Check a complete block against its name; hand it over (1) or start it again (0)."""
        if sha256(blk.buf) != blk.digest:
            # every chunk matched digests that do not add up to the block's name: the digest
            # list itself was wrong; nothing of it can be trusted
            blk.restarts += 1
            if blk.restarts > 2:
                raise DeliveryError(f"block {blk.hex[:12]} does not match its hash")
            self._drop_partial(blk)
            blk.size = None
            rep.corrupt_chunks += len(blk.have)
            queue.append((blk.digest, -1))
            return 0
        self.write_block(blk.hex, bytes(blk.buf))
        self._drop_partial(blk)
        rep.bytes += blk.size or 0
        rep.per_block.append({"block": blk.hex, "bytes": blk.size,
                              "ms": round((time.monotonic() - blk.t0) * 1e3, 3)})
        blk.buf = bytearray()
        blk.remaining = -1  # done: late replies for it are duplicates
        return 1

