"""Turning off the NIC offloads that would make a userspace link see 64 KB super-packets.

With checksum offload and TSO/GSO/GRO on, a veth hands an AF_PACKET socket frames with
unfinished checksums or many segments in one; per-packet loss, queue limits and rate then act
on the wrong unit.  ``ethtool -K`` switches them off (inside another namespace via nsenter).
"""

from __future__ import annotations

import subprocess

FEATURES = ("tx", "off", "tso", "off", "gso", "off", "gro", "off")


def disable_offloads(ifname: str, pid: int | None = None, *, netns: str | None = None) -> None:
    """Checksum offload, TSO, GSO and GRO off on ``ifname``.

    The interface lives in the namespace of ``pid``, or in the named namespace ``netns``
    (``ip netns``), or in our own."""
    argv = ["ethtool", "-K", ifname, *FEATURES]
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    elif pid is not None:
        argv = ["nsenter", "-t", str(pid), "-n", *argv]
    res = subprocess.run(argv, capture_output=True, text=True)
    if res.returncode != 0:
        msg = (res.stderr or res.stdout).strip().splitlines()
        raise RuntimeError(f"ethtool -K {ifname} failed: {msg[-1] if msg else res.returncode}")
