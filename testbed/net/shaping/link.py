"""A link as the shaping backends see it: its topology entry and the interfaces of its two ends."""

from __future__ import annotations

from dataclasses import dataclass

from testbed.spec.topology import LinkSpec


@dataclass
class LinkEnd:
    """One end of a link.

    ``ifname`` carries this end's egress traffic (kernel backend: the interface in the node; userspace
    backend: the root-namespace port the link process reads); ``pid`` holds its namespace (None: the
    root namespace, e.g. a cell's bridge port); ``host_if`` is the interface inside the node when
    that is not ``ifname`` (userspace backend)."""

    node: str
    ifname: str
    pid: int | None
    host_if: str | None = None


@dataclass
class Link:
    """Link ``index`` of the topology: ``a`` sends ``spec.up``, ``b`` sends ``spec.down``."""

    index: int
    spec: LinkSpec
    a: LinkEnd
    b: LinkEnd

    @property
    def name(self) -> str:
        return f"{self.spec.a}<->{self.spec.b}"
