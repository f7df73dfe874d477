"""Block delivery on loopback: verified, chunked, corrupt chunks fetched again, resumed after a
restarted sender or receiver with nothing verified fetched twice; the wire header is strict."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import pytest
import zmq

from testbed.apps.caching.delivery import (
    BlockFetcher,
    BlockServer,
    DeliveryError,
    credit_for,
    transfer_bound_s,
)
from testbed.wire import blockxfer as bx
from testbed.wire.payload import WireError

CHUNK = 16 * 1024


def make_blocks(*sizes: int) -> dict[str, bytes]:
    out = {}
    for n in sizes:
        data = os.urandom(n)
        out[hashlib.sha256(data).hexdigest()] = data
    return out


class CorruptingServer(BlockServer):
    """The test's own sender: flips a byte in the first send of the chosen chunks."""

    def __init__(self, *a, corrupt: set[tuple[str, int]], **kw) -> None:
        super().__init__(*a, **kw)
        self.corrupt = set(corrupt)
        self.sent: list[tuple[str, int]] = []

    def chunk_payload(self, hexdigest, offset, data):
        self.sent.append((hexdigest, offset))
        if (hexdigest, offset) in self.corrupt:
            self.corrupt.discard((hexdigest, offset))
            bad = bytearray(data)
            bad[len(bad) // 2] ^= 0xFF
            return bytes(bad)
        return data


def test_wire_rejects_malformed_messages():
    d = hashlib.sha256(b"x").digest()
    good = bx.chunk(d, CHUNK, 3 * CHUNK, CHUNK, bytes(CHUNK)).frames()
    assert bx.parse(good).offset == CHUNK
    req = bx.chunk_request(d, CHUNK, CHUNK, CHUNK)
    req.seq = 2**40 + 7  # a request's number travels whole and comes back in its reply
    assert bx.parse(req.frames()).seq == 2**40 + 7
    with pytest.raises(WireError, match="bytes at"):
        bx.parse([good[0], bytes(CHUNK - 1)])
    with pytest.raises(WireError, match="offset"):
        bx.parse(bx.chunk(d, 5, 3 * CHUNK, CHUNK, bytes(CHUNK)).frames())
    with pytest.raises(WireError, match="digest bytes"):
        bx.parse(bx.meta(d, 3 * CHUNK, CHUNK, bytes(64)).frames())
    with pytest.raises(WireError, match="chunk size"):
        bx.parse(bx.meta_request(d, 10).frames())
    with pytest.raises(WireError, match="magic"):
        bx.parse([b"XXXX" + bytes(good[0])[4:], good[1]])
    with pytest.raises(WireError, match="frames"):
        bx.parse(bx.meta_request(d, CHUNK).frames() + [b"extra"])


def test_credit_covers_the_bandwidth_delay_product():
    # 50 Mbit/s x 40 ms = 250 kB: eight times that in 128 KiB chunks
    assert credit_for(50, 40, 128 * 1024) == 16
    assert credit_for(50, 40, 16 * 1024) == 123
    assert credit_for(50, 40, 128 * 1024, factor=2) == 4
    assert credit_for(None, None) == 4
    assert transfer_bound_s(6_250_000, 50, 40) == pytest.approx(1.0 + 0.04)
    assert transfer_bound_s(6_250_000, 50, 40, rounds=2) == pytest.approx(1.0 + 0.08)


def test_fetch_verifies_and_refetches_a_corrupt_chunk():
    blocks = make_blocks(5 * CHUNK + 123, 3 * CHUNK, 17, 0)
    big = next(iter(blocks))
    got: dict[str, bytes] = {}
    with CorruptingServer("tcp://127.0.0.1:*", blocks.get, corrupt={(big, 2 * CHUNK)}) as srv, \
            BlockFetcher(srv.endpoint, got.__setitem__, chunk_bytes=CHUNK, credit=3) as f:
        rep = f.fetch(list(blocks) + [big])
    assert got == blocks
    assert rep.blocks == 4 and rep.bytes == sum(map(len, blocks.values()))
    assert rep.corrupt_chunks == 1 and rep.chunks == 6 + 3 + 1
    # the corrupt chunk went twice, every other chunk once
    assert srv.sent.count((big, 2 * CHUNK)) == 2 and len(srv.sent) == len(set(srv.sent)) + 1
    assert rep.goodput_mbit > 0 and rep.bound_s is None


def test_missing_block_and_bad_name_fail_clearly():
    blocks = make_blocks(100)
    with BlockServer("tcp://127.0.0.1:*", blocks.get) as srv, \
            BlockFetcher(srv.endpoint, lambda h, b: None, chunk_bytes=CHUNK) as f:
        with pytest.raises(DeliveryError, match="holds no block"):
            f.fetch([hashlib.sha256(b"nothing").hexdigest()])
        with pytest.raises(ValueError, match="not a hex SHA-256"):
            f.fetch(["abc"])


def test_sender_never_serves_a_block_that_does_not_match_its_name():
    name = hashlib.sha256(b"right").hexdigest()
    with BlockServer("tcp://127.0.0.1:*", {name: b"wrong"}.get) as srv, \
            BlockFetcher(srv.endpoint, lambda h, b: None, chunk_bytes=CHUNK) as f, \
            pytest.raises(DeliveryError, match="does not match its hash"):
        f.fetch([name])


def test_restarted_receiver_resumes_from_its_partial_file(tmp_path: Path):
    blocks = make_blocks(40 * CHUNK)
    name, data = next(iter(blocks.items()))

    class Crash(Exception):
        pass

    def crash_after_10(h: str, idx: int, n: int) -> None:
        nonlocal seen
        seen += 1
        if seen == 10:
            raise Crash

    seen = 0
    got: dict[str, bytes] = {}
    with CorruptingServer("tcp://127.0.0.1:*", blocks.get, corrupt=set()) as srv:
        with BlockFetcher(srv.endpoint, got.__setitem__, chunk_bytes=CHUNK, credit=4,
                          partial_dir=tmp_path, on_chunk=crash_after_10) as f, pytest.raises(Crash):
            f.fetch([name])
        assert (tmp_path / f"{name}.part").exists() and got == {}
        time.sleep(0.3)  # the sender answers what the dead receiver still had in flight
        first = len(srv.sent)
        with BlockFetcher(srv.endpoint, got.__setitem__, chunk_bytes=CHUNK, credit=4,
                          partial_dir=tmp_path) as f:
            rep = f.fetch([name])
    assert got == {name: data}
    assert rep.resumed_bytes == 10 * CHUNK and rep.chunks == 30
    # the second receiver asked only for chunks the first had not verified
    again = srv.sent[first:]
    verified = {(name, i * CHUNK) for i in range(10)}
    assert len(again) == 30 and not set(again) & verified and rep.rerequested == 0
    assert not (tmp_path / f"{name}.part").exists()


def test_restarted_sender_lost_requests_are_asked_again():
    blocks = make_blocks(60 * CHUNK)
    name, data = next(iter(blocks.items()))
    srv = BlockServer("tcp://127.0.0.1:*", blocks.get)
    endpoint = srv.endpoint
    restarted = threading.Event()
    second: list[BlockServer] = []

    def restart_after_20(h: str, idx: int, n: int) -> None:
        if rep_count[0] == 20 and not restarted.is_set():
            restarted.set()
            # the sender goes away with requests unanswered and comes back on the same port
            srv.stop()
            second.append(BlockServer(endpoint, blocks.get).start())
        rep_count[0] += 1

    rep_count = [0]
    srv.start()
    got: dict[str, bytes] = {}
    try:
        with BlockFetcher(endpoint, got.__setitem__, chunk_bytes=CHUNK, credit=6, timeout_s=0.3,
                          on_chunk=restart_after_20) as f:
            rep = f.fetch([name])
    finally:
        for s in second:
            s.stop()
    assert got == {name: data} and restarted.is_set()
    assert rep.chunks == 60
    # the two senders together sent each chunk about once: at most the window again
    sent = srv.stats.chunks_sent + second[0].stats.chunks_sent
    assert 60 <= sent <= 60 + 2 * 6


class HoldingServer(BlockServer):
    """The test's own sender: answers nothing until ``hold`` requests have come, then all of them in
    order (and later ones at once).  A fetcher that waited for a reply before sending more would stall."""

    def __init__(self, *a, hold: int, **kw) -> None:
        super().__init__(*a, **kw)
        self.hold = hold
        self.held: list[list[bytes]] = []

    def serve(self, stop=None, poll_ms: int = 100) -> None:
        stop = stop or self._stop
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        while not stop.is_set():
            if not poller.poll(poll_ms):
                continue
            frames = self.sock.recv_multipart(copy=True)
            self.held.append(frames)
            if len(self.held) < self.hold:
                continue
            for f in self.held:
                self.sock.send_multipart([f[0], *self.handle(f[1:])], copy=False)
            self.held, self.hold = [], 0


def test_with_sizes_every_request_goes_out_at_once():
    """Sizes known: a block of more than one chunk costs its digests and every chunk, a one-chunk block
    its chunk only (checked against its name), the empty block nothing; all asked before any reply."""
    blocks = make_blocks(5 * CHUNK + 7, *[300 + i for i in range(20)], 0)
    names = list(blocks)
    got: dict[str, bytes] = {}
    with HoldingServer("tcp://127.0.0.1:*", blocks.get, hold=1 + 6 + 20) as srv, \
            BlockFetcher(srv.endpoint, got.__setitem__, chunk_bytes=CHUNK, window_bytes=10**7,
                         give_up_s=5) as f:
        rep = f.fetch(names, [len(blocks[h]) for h in names])
    assert got == blocks
    assert srv.stats.meta_sent == 1 and srv.stats.chunks_sent == 6 + 20 and rep.rerequested == 0
    assert rep.chunks == 26 and rep.bound_s is None and rep.received_s <= rep.elapsed_s


def test_without_sizes_digests_and_first_chunk_go_together():
    """Sizes unknown: each block's digests and first chunk in one round (a first chunk counts a whole
    chunk against the window); a one-chunk block is then done; the other chunks of a larger one follow
    its digests."""
    blocks = make_blocks(3 * CHUNK, *[100 + i for i in range(10)])
    got: dict[str, bytes] = {}
    with HoldingServer("tcp://127.0.0.1:*", blocks.get, hold=2 * 11) as srv, \
            BlockFetcher(srv.endpoint, got.__setitem__, chunk_bytes=CHUNK, window_bytes=11 * CHUNK,
                         give_up_s=5) as f:
        rep = f.fetch(list(blocks))
    assert got == blocks and rep.chunks == 3 + 10
    assert srv.stats.chunks_sent == 13 and srv.stats.meta_sent == 11 and rep.duplicates == 0


def test_window_counts_bytes_not_requests():
    """Many small blocks: the requests outstanding are bounded by the window's bytes, not by a count
    sized for full chunks (a count of 4 would stall the holding sender)."""
    blocks = make_blocks(*[500] * 40)
    with HoldingServer("tcp://127.0.0.1:*", blocks.get, hold=40) as srv, \
            BlockFetcher(srv.endpoint, lambda h, b: None, chunk_bytes=CHUNK, rate_mbit=50, rtt_ms=40,
                         give_up_s=5) as f:
        assert f.window_bytes == credit_for(50, 40, CHUNK) * CHUNK
        rep = f.fetch(list(blocks), [500] * 40)
    assert rep.bytes == 40 * 500 and rep.bound_ratio is not None


def test_a_wrong_size_and_a_failed_write_stop_the_fetch():
    blocks = make_blocks(3 * CHUNK)
    name, data = next(iter(blocks.items()))
    with BlockServer("tcp://127.0.0.1:*", blocks.get) as srv:
        for wrong in (2 * CHUNK, 100):  # told by the digests; told by the one chunk asked for
            with BlockFetcher(srv.endpoint, lambda h, b: None, chunk_bytes=CHUNK) as f, \
                    pytest.raises(DeliveryError, match="expected"):
                f.fetch([name], [wrong])
        with BlockFetcher(srv.endpoint, lambda h, b: None, chunk_bytes=CHUNK) as f, \
                pytest.raises(ValueError, match="cannot be right"):
            f.fetch([name], [0])

        def full(h: str, b: bytes) -> None:
            raise OSError("disk full")

        with BlockFetcher(srv.endpoint, full, chunk_bytes=CHUNK) as f, pytest.raises(OSError, match="full"):
            f.fetch([name], [len(data)])
