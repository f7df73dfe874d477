"""Link shaping: one interface (``Shaper``), two backends.

* ``kernel`` (``kernel_backend.KernelShaper``): HTB + netem qdiscs on each end's egress
  (``kernel.py``), traces replayed by a thread (``replay.py``).
* ``userspace`` (``userspace.UserspaceShaper``): one link process per link (``linkproc.py``)
  joining the link's two root-namespace ports.

The network picks one backend object (``make_shaper``) and hands it every link; a backend owns
its links' shaping from ``apply`` to ``close``.

Shaping semantics (the same on both backends; the README has this table too):

=====================  =====================================================================
setting                meaning on both backends
=====================  =====================================================================
``bw_mbit`` / trace    a rate counts IP bytes: the Ethernet header is not counted (link
                       process: frame - 14 bytes; kernel: a size table with overhead -14 on
                       HTB).  A mahimahi line delivers 1500 IP bytes.
``queue_pkts``         packets waiting for the rate (drop-tail; default 1000); packets waiting
                       out their delay do not count (kernel: netem's limit is the queue plus
                       the full-size packets the rate carries during delay + jitter).  A
                       packet is one IP packet: segmentation offloads are off on shaped links.
``delay_ms``           one-way, added after the rate queue; the same for every packet
``jitter_ms``          uniform in +-jitter around the delay; never reorders: a packet never
                       leaves before the one ahead of it (kernel: netem with a rate, which
                       keeps its queue in order)
``loss_pct``           independent random loss per packet, before the queue
=====================  =====================================================================
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from testbed.net.shaping.link import Link, LinkEnd
from testbed.spec.topology import Shaping

__all__ = ["Link", "LinkEnd", "Shaper", "make_shaper"]


@runtime_checkable
class Shaper(Protocol):
    """What the network asks of a shaping backend."""

    name: str  # "kernel" | "userspace" (``testbed.spec.options.SHAPERS``)
    joins_in_root: bool  # True: each link end gets a root-namespace port that the backend joins

    @property
    def trace_t0(self) -> float | None:
        """``time.monotonic()`` of trace bin 0 when the backend replays traces on one clock."""
        ...

    def apply_all(self, links: list[Link]) -> None:
        """Shape every link as its spec says (in parallel where the backend can)."""

    def apply(self, link: Link, up: Shaping, down: Shaping) -> None:
        """Shape ``link``: ``up`` on a -> b, ``down`` on b -> a."""

    def update(self, link: Link, up: Shaping | None = None, down: Shaping | None = None) -> None:
        """Change a shaped link's rate, delay, jitter, loss (None: leave that direction)."""

    def remove(self, link: Link) -> None:
        """Take ``link``'s shaping away."""

    def check(self) -> None:
        """Raise ``testbed.net.errors.NetworkError`` naming the link when a part has failed."""

    def close(self) -> None:
        """Remove every link's shaping and stop the backend's helpers."""


def make_shaper(name: str, *, netem: bool | None = None, on_started=None) -> Shaper:
    """The backend object for ``name`` (as ``capabilities.choose_shaper`` returned it).

    ``netem``: whether the kernel has it (probed when None); ``on_started(pid)``: told each
    link process the userspace backend starts."""
    if name == "kernel":
        from testbed.net.shaping.kernel_backend import KernelShaper

        if netem is None:
            from testbed.net import capabilities

            netem = capabilities.probe().netem
        return KernelShaper(netem)
    if name == "userspace":
        from testbed.net.shaping.userspace import UserspaceShaper

        return UserspaceShaper(on_started)
    raise ValueError(f"unknown shaping backend {name!r}")
