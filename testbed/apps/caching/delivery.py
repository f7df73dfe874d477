"""Model-block delivery over ZeroMQ: chunked, credit-based flow control, resumable, verified.

The receiver pulls (the idea of the ZeroMQ guide's file-transfer chapter): it keeps up to
``window_bytes`` of chunk requests outstanding and sends new ones as chunks arrive, so the sender
never pushes more than the receiver asked for and the pipe stays full when the window covers the
link's bandwidth-delay product (``credit_for``: eight times it).  With the blocks' sizes known every
request of a fetch goes out at once (one round trip; see ``BlockFetcher``).

* **Verified.**  A block is named by the SHA-256 of its bytes.  For a block of more than one chunk the
  receiver asks for the SHA-256 of each chunk (``META``, answered before the block's chunks); a chunk
  whose digest does not match is asked for again and never written; a one-chunk block is checked
  against its name; the whole block is checked against its name before ``write_block`` sees it.
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

import contextlib
import hashlib
import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import zmq

from testbed.wire import blockxfer as bx
from testbed.wire.payload import WireError

DEFAULT_CHUNK = 128 * 1024
MAX_OUTSTANDING = 4096  # requests in flight when the window is counted in bytes only
EMPTY = hashlib.sha256(b"").digest()  # the empty block's name: it is known without asking
ReadBlock = Callable[[str], "bytes | None"]
WriteBlock = Callable[[str, bytes], None]


class DeliveryError(RuntimeError):
    """A fetch that cannot complete: the sender lacks the block, corrupts it, or stays silent."""


def credit_for(rate_mbit: float | None, rtt_ms: float | None, chunk_bytes: int = DEFAULT_CHUNK,
               factor: float = 8.0, floor: int = 4, cap: int = 4096) -> int:
    """Outstanding chunk requests that keep a ``rate_mbit`` link with ``rtt_ms`` busy.

    ``factor`` x the bandwidth-delay product: one BDP keeps the link busy only if the two
    user-space ends answered at once; the slack covers their scheduling delays on a busy host
    (``bench/delivery_goodput.py``: at 50 Mbit/s and 40 ms, 2x reached 61 % of the rate, 4x and
    8x 70 % on a machine with load 14, where iperf3 reached 97 %) and, after a link outage, keeps the
    sender supplied with requests while the receiver's own requests wait out TCP's retransmission
    back-off (through two 1 s outages: 4x 0.66 of the time up, 8x 0.76, 16x 0.74).  A window beyond
    TCP's congestion window adds no drops: the excess waits in the sender's socket, as zero-copy
    views of a block it holds anyway."""
    if not rate_mbit or rtt_ms is None:
        return floor
    bdp = rate_mbit * 1e6 / 8 * rtt_ms / 1e3
    return max(floor, min(cap, math.ceil(factor * bdp / chunk_bytes)))


def transfer_bound_s(nbytes: int, rate_mbit: float, rtt_ms: float, rounds: int = 1) -> float:
    """Analytic lower bound of a fetch: the bytes at the link rate plus ``rounds`` round trips (one when
    every request goes out at once; two when the digests must tell a block's size first).  TCP's slow
    start and headers are left out (``testbed.apps.caching.analytic`` counts them)."""
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
    elapsed_s: float = 0.0  # until every block was verified and written (``received_s`` + ``write_wait_s``)
    goodput_mbit: float = 0.0  # (bytes - resumed_bytes) over received_s
    bound_s: float | None = None  # transfer_bound_s of the fetched bytes, when the link is known
    bound_ratio: float | None = None  # bound_s / received_s (1.0 = the bound)
    chunk_bytes: int = DEFAULT_CHUNK
    credit: int = 0  # most requests outstanding
    window_bytes: int = 0  # most chunk bytes asked for and not yet received
    chunks: int = 0  # chunks verified and kept
    corrupt_chunks: int = 0  # failed their digest: asked for again, never written
    rerequested: int = 0  # requests sent again (lost to a restarted sender, or timeout probes)
    duplicates: int = 0  # replies to requests already answered (dropped)
    timeouts: int = 0
    first_request_s: float | None = None  # from the fetch's start to its first request sent
    first_reply_s: float | None = None  # ... to the first reply received (one round trip + the sender)
    received_s: float = 0.0  # from the start to the last block verified in memory (the delivery)
    write_wait_s: float = 0.0  # then waited for the store's writes of the verified blocks
    per_block: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class _Block:
    def __init__(self, hexdigest: str, size_hint: int | None = None) -> None:
        self.hex = hexdigest
        self.digest = _digest(hexdigest)
        self.hint = size_hint
        self.size: int | None = None
        self.digests = b""  # chunk digests (META); empty until they come
        self.buf = bytearray()
        self.have = bytearray()
        self.asked: set[int] = set()  # chunk indices queued or in flight since the size became known
        self.early: dict[int, bytes] = {}  # chunks that came before their digests
        self.remaining = 0
        self.failures = 0
        self.restarts = 0
        self.partial = None
        self.t0 = 0.0

    def sized(self, size: int, chunk_bytes: int) -> None:
        self.size = size
        self.buf = bytearray(size)
        self.have = bytearray(bx.n_chunks(size, chunk_bytes))
        self.remaining = len(self.have)

    def chunk_ok(self, idx: int, data: bytes | memoryview) -> bool:
        return sha256(data) == self.digests[idx * bx.DIGEST_BYTES:(idx + 1) * bx.DIGEST_BYTES]


class _Writer:
    """Hands verified blocks to ``write_block`` on one thread of its own, in order, so a store's disk
    writes (a write and an fsync per block) overlap the transfer instead of stalling the receive loop."""

    def __init__(self, write_block: WriteBlock) -> None:
        self.write_block = write_block
        self.pool: ThreadPoolExecutor | None = None
        self.jobs: list[Future] = []

    def put(self, h: str, data: bytes) -> None:
        if self.pool is None:
            self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="block-writer")
        self.jobs.append(self.pool.submit(self.write_block, h, data))
        if self.jobs[0].done():
            self.check()

    def check(self) -> None:
        """Raise the first failed write's error (finished jobs are dropped)."""
        while self.jobs and self.jobs[0].done():
            self.jobs.pop(0).result()

    def drain(self) -> None:
        """Wait for every write; raise the first error."""
        jobs, self.jobs = self.jobs, []
        for j in jobs:
            j.result()

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None


class BlockFetcher:
    """Fetches blocks from one ``BlockServer`` endpoint and hands each, verified, to ``write_block``.

    ``rate_mbit``/``rtt_ms`` describe the path (from the topology): they size the window (unless
    ``credit`` is given) and give each report its analytic bound.

    The window is counted in bytes asked for: ``window_bytes`` (``credit_for`` chunks' worth by default,
    eight times the bandwidth-delay product) of chunk requests outstanding, so a model's many small
    tensors keep as many bytes in flight as one large block.  ``credit`` given: at most that many
    requests outstanding (and ``credit`` chunks' worth of bytes), as before.

    One round trip per fetch when the blocks' sizes are known (``fetch(..., sizes=)``): for each block
    the digest request (``META_REQ``, only for a block of more than one chunk) and every chunk request go
    out together; the sender answers in order, so the digests come before the chunks they check.
    Without sizes, each block's digests and its first chunk are asked for together (a one-chunk block
    is then done in one round trip: its bytes are checked against its name) and the other chunks when
    the digests tell the size."""

    def __init__(self, endpoint: str, write_block: WriteBlock, *, chunk_bytes: int = DEFAULT_CHUNK,
                 credit: int | None = None, rate_mbit: float | None = None, rtt_ms: float | None = None,
                 timeout_s: float | None = None, give_up_s: float = 60.0, max_corrupt: int = 8,
                 partial_dir: Path | None = None, ctx: zmq.Context | None = None,
                 on_chunk: Callable[[str, int, int], None] | None = None,
                 window_bytes: int | None = None) -> None:
        if not bx.MIN_CHUNK <= chunk_bytes <= bx.MAX_CHUNK:
            raise ValueError(f"chunk size {chunk_bytes} outside [{bx.MIN_CHUNK}, {bx.MAX_CHUNK}]")
        self.write_block = write_block
        self.chunk_bytes = chunk_bytes
        self.rate_mbit, self.rtt_ms = rate_mbit, rtt_ms
        if credit:
            self.credit = credit
            self.window_bytes = window_bytes or credit * chunk_bytes
        else:
            self.credit = MAX_OUTSTANDING
            self.window_bytes = window_bytes or credit_for(rate_mbit, rtt_ms, chunk_bytes) * chunk_bytes
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
        self._monitor = self.sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self._connected = False
        self.sock.connect(endpoint)
        self.writer = _Writer(write_block)

    def wait_connected(self, timeout_s: float = 10.0) -> bool:
        """Wait until the connection to the sender is up (TCP and ZeroMQ's handshake): a fetch that
        follows starts with its requests, not with the connection's set-up.  False on timeout."""
        if self._connected:
            return True
        if self._monitor.poll(int(timeout_s * 1000)):
            self._monitor.recv_multipart()
            self._connected = True
        return self._connected

    def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(zmq.ZMQError):
            self.sock.disable_monitor()
        self._monitor.close(linger=0)
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
                if not blk.have[idx] and blk.chunk_ok(idx, piece):
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

    def _first_keys(self, blk: _Block) -> list[tuple[bytes, int]]:
        """The requests that start a block: its digests (unless it is known to be one chunk) and the
        chunks known to exist (all of them with a size hint, else the first; none when a partial file
        may already hold them)."""
        resumable = (p := self._partial_path(blk)) is not None and p.exists()
        if blk.hint is not None and not resumable:
            n = bx.n_chunks(blk.hint, self.chunk_bytes)
            if n <= 1:
                blk.sized(blk.hint, self.chunk_bytes)
                blk.asked = set(range(n))
                return [(blk.digest, i) for i in range(n)]
            blk.sized(blk.hint, self.chunk_bytes)
            blk.asked = set(range(n))
            return [(blk.digest, -1)] + [(blk.digest, i) for i in range(n)]
        if resumable:
            return [(blk.digest, -1)]
        blk.asked = {0}
        return [(blk.digest, -1), (blk.digest, 0)]

    # -- the transfer --

    def fetch(self, hexdigests: Sequence[str], sizes: Sequence[int] | None = None) -> FetchReport:
        """Fetch every block named (duplicates once); returns when all are written.  ``sizes``: each
        block's size in bytes when known (a manifest lists them): every request then goes out at once."""
        if sizes is not None and len(sizes) != len(hexdigests):
            raise ValueError(f"{len(sizes)} sizes for {len(hexdigests)} blocks")
        blocks: dict[bytes, _Block] = {}
        for i, h in enumerate(hexdigests):
            blk = _Block(h.lower(), int(sizes[i]) if sizes is not None else None)
            if blk.hint is not None and (blk.hint < 0 or (blk.hint == 0) != (blk.digest == EMPTY)):
                raise ValueError(f"block {blk.hex[:12]}: size {blk.hint} cannot be right")
            blocks.setdefault(blk.digest, blk)
        rep = FetchReport(blocks=len(blocks), chunk_bytes=self.chunk_bytes, credit=self.credit,
                          window_bytes=self.window_bytes)
        # (digest, chunk index or -1 for the digests) -> (request number, bytes asked), in the order sent
        inflight: OrderedDict[tuple[bytes, int], tuple[int, int]] = OrderedDict()
        queue: deque[tuple[bytes, int]] = deque()
        pending = len(blocks)
        for blk in blocks.values():
            if blk.digest == EMPTY:  # nothing to ask for: its (no) bytes match its name
                blk.sized(0, self.chunk_bytes)
                pending -= self._finish(blk, rep, queue)
            else:
                queue.extend(self._first_keys(blk))
        seq = probes = 0
        asked_bytes = 0  # chunk bytes outstanding (the window)
        t0 = time.monotonic()
        last_rx = last_progress = t0
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)

        def length(key: tuple[bytes, int]) -> int:
            digest, idx = key
            if idx < 0:
                return 0
            size = blocks[digest].size
            return self.chunk_bytes if size is None else min(self.chunk_bytes, size - idx * self.chunk_bytes)

        def send(key: tuple[bytes, int]) -> None:
            nonlocal seq, asked_bytes
            digest, idx = key
            n = length(key)
            if idx < 0:
                msg = bx.meta_request(digest, self.chunk_bytes)
            else:
                msg = bx.chunk_request(digest, idx * self.chunk_bytes, n, self.chunk_bytes)
            seq += 1
            msg.seq = seq
            if key in inflight:
                asked_bytes -= inflight[key][1]
            inflight[key] = (seq, n)
            asked_bytes += n
            inflight.move_to_end(key)
            self.sock.send_multipart(msg.frames(), copy=False)
            if rep.first_request_s is None:
                rep.first_request_s = time.monotonic() - t0

        def done_with(key: tuple[bytes, int]) -> None:
            nonlocal asked_bytes
            entry = inflight.pop(key, None)
            if entry is not None:
                asked_bytes -= entry[1]

        def answered(key: tuple[bytes, int], mine: int) -> None:
            """The reply to request ``mine`` (for ``key``) came: take ``key`` off the in-flight list;
            requests sent before ``mine`` and still unanswered are lost (replies come in the order
            asked): queue them again.  A probe keeps its key in flight with the probe's number, so the
            reply to the original request loses nothing else."""
            done_with(key)
            lost = []
            for k, (s, _) in inflight.items():
                if s >= mine:
                    break
                lost.append(k)
            for k in reversed(lost):
                done_with(k)
                queue.appendleft(k)
                rep.rerequested += 1

        def room(key: tuple[bytes, int]) -> bool:
            if key[1] < 0:
                return True  # a digest request asks for a few bytes: never held back
            return len(inflight) < self.credit and (asked_bytes < self.window_bytes or not inflight)

        def accept(blk: _Block, idx: int, data: bytes | memoryview) -> None:
            """A verified chunk: into the block's buffer (and its partial file)."""
            off = idx * self.chunk_bytes
            blk.buf[off:off + len(data)] = data
            blk.have[idx] = 1
            blk.remaining -= 1
            rep.chunks += 1
            if blk.partial is not None:
                blk.partial.seek(off)
                blk.partial.write(data)
            if self.on_chunk is not None:
                self.on_chunk(blk.hex, idx, len(data))

        def corrupt(blk: _Block, idx: int) -> None:
            rep.corrupt_chunks += 1
            blk.failures += 1
            if blk.failures > self.max_corrupt:
                raise DeliveryError(f"block {blk.hex[:12]}: {blk.failures} corrupt chunks")
            queue.appendleft((blk.digest, idx))

        try:
            while pending:
                while queue and room(queue[0]):
                    key = queue.popleft()
                    blk = blocks[key[0]]
                    if blk.remaining < 0 or (key[1] >= 0 and blk.size is not None and blk.have[key[1]]):
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
                if rep.first_reply_s is None:
                    rep.first_reply_s = last_rx - t0
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
                    if blk.digests or blk.remaining < 0:
                        rep.duplicates += 1
                        continue
                    if msg.chunk_bytes != self.chunk_bytes:
                        raise DeliveryError(f"digests for {msg.chunk_bytes}-byte chunks, "
                                            f"asked for {self.chunk_bytes}")
                    if blk.size is None:
                        blk.sized(msg.total, self.chunk_bytes)
                    elif msg.total != blk.size:
                        raise DeliveryError(f"block {blk.hex[:12]} is {msg.total} bytes at the sender, "
                                            f"{blk.size} expected")
                    blk.digests = bytes(msg.payload)
                    blk.t0 = blk.t0 or time.monotonic()
                    rep.resumed_bytes += self._resume(blk)
                    for idx, data in sorted(blk.early.items()):
                        if blk.have[idx]:
                            continue
                        if blk.chunk_ok(idx, data):
                            accept(blk, idx, data)
                        else:
                            corrupt(blk, idx)
                    blk.early.clear()
                    new = [i for i in range(len(blk.have)) if not blk.have[i] and i not in blk.asked]
                    blk.asked.update(new)
                    queue.extend((blk.digest, i) for i in new)
                    last_progress = time.monotonic()
                elif msg.kind == bx.Kind.CHUNK:
                    idx = msg.offset // self.chunk_bytes
                    rep.wire_chunk_bytes += msg.length
                    if msg.chunk_bytes != self.chunk_bytes or blk.remaining < 0:
                        rep.duplicates += 1
                        continue
                    if blk.size is None:  # the first chunk came before the digests: it tells the size
                        blk.sized(msg.total, self.chunk_bytes)
                    if msg.total != blk.size:  # a size given for the fetch, or told before, is wrong
                        raise DeliveryError(f"block {blk.hex[:12]} is {msg.total} bytes at the sender, "
                                            f"{blk.size} expected")
                    answered((msg.digest, idx), msg.seq)  # a late reply to a request thought lost counts
                    if blk.have[idx]:
                        rep.duplicates += 1
                        continue
                    blk.t0 = blk.t0 or time.monotonic()
                    if blk.digests:
                        ok = blk.chunk_ok(idx, msg.payload)
                    elif len(blk.have) == 1:
                        ok = sha256(msg.payload) == blk.digest  # the whole block: checked against its name
                    else:
                        blk.early[idx] = bytes(msg.payload)  # checked when the digests come
                        continue
                    if not ok:
                        corrupt(blk, idx)
                        continue
                    accept(blk, idx, msg.payload)
                    last_progress = time.monotonic()
                if blk.size is not None and blk.remaining == 0:
                    pending -= self._finish(blk, rep, queue)
            t_rx = time.monotonic()
            rep.received_s = t_rx - t0
            self.writer.drain()
            rep.elapsed_s = time.monotonic() - t0
            rep.write_wait_s = rep.elapsed_s - rep.received_s
        except BaseException:
            with contextlib.suppress(Exception):
                self.writer.drain()  # no write of this fetch may land during the next one
            raise
        finally:
            for blk in blocks.values():
                if blk.partial is not None:
                    blk.partial.close()
                    blk.partial = None
        fetched = rep.bytes - rep.resumed_bytes
        took = rep.received_s or rep.elapsed_s  # the delivery: the store's writes after it are the disk's
        rep.goodput_mbit = fetched * 8 / took / 1e6 if took > 0 else 0.0
        if self.rate_mbit:
            rounds = 1 if sizes is not None else 2
            rep.bound_s = transfer_bound_s(fetched, self.rate_mbit, self.rtt_ms or 0.0, rounds)
            rep.bound_ratio = rep.bound_s / took if took > 0 else None
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
            blk.size, blk.digests, blk.hint = None, b"", None
            blk.asked, blk.early = set(), {}
            rep.corrupt_chunks += len(blk.have)
            queue.extend(self._first_keys(blk))
            return 0
        self.writer.put(blk.hex, bytes(blk.buf))
        self._drop_partial(blk)
        rep.bytes += blk.size or 0
        rep.per_block.append({"block": blk.hex, "bytes": blk.size,
                              "ms": round((time.monotonic() - blk.t0) * 1e3, 3)})
        blk.buf = bytearray()
        blk.remaining = -1  # done: late replies for it are duplicates
        return 1
