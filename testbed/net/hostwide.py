"""Host-wide settings a run changes, recorded in its state file and put back when it ends.

Two kinds: the bridge netfilter sysctls (off, or Docker's FORWARD DROP would drop bridged
frames) and the root namespace's allowed congestion controls (a namespace may only use an
allowed one).  A run records the value it found for each setting it changed (``changed``) and
what it needs (``needs``); a value provisioning already set is never changed, so never
restored.  At teardown (or ``testbed clean`` for a dead run) a setting is put back unless
another live run still needs it: then the value found is handed over to that run's state file
(``handed_over``), and that run puts it back when it ends.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

BRIDGE_NF = tuple(f"net.bridge.bridge-nf-call-{f}" for f in ("iptables", "ip6tables", "arptables"))
TCP_ALLOWED = "net.ipv4.tcp_allowed_congestion_control"
SYSCTL_ROOT = Path("/proc/sys")  # tests point this at a folder of their own


def _path(key: str) -> Path:
    return SYSCTL_ROOT / key.replace(".", "/")


def read(key: str) -> str | None:
    try:
        with open(_path(key)) as f:
            return f.read().strip()
    except OSError:
        return None


def write(key: str, value: str) -> None:
    with open(_path(key), "w") as f:
        f.write(value)


def bridge_nf_off() -> dict[str, str]:
    """Switch bridge netfilter off; ``{sysctl: value found}`` for those that were on."""
    changed = {}
    for key in BRIDGE_NF:
        old = read(key)
        if old is None or old == "0":
            continue
        with contextlib.suppress(OSError):
            write(key, "0")
            changed[key] = old
    return changed


def allowed_tcp_cc(ensure: Callable[[], None]) -> dict[str, str]:
    """Run ``ensure`` (which may allow a congestion control); ``{sysctl: value found}`` if it did."""
    old = read(TCP_ALLOWED)
    ensure()
    new = read(TCP_ALLOWED)
    return {TCP_ALLOWED: old} if old is not None and new != old else {}


def restore(changed: dict[str, str], others_need: list[dict],
            hand_over: Callable[[str, str], None] | None = None) -> list[str]:
    """Put ``changed`` back, minding what other live runs need; the settings written.

    ``others_need``: the ``needs`` records of the other live runs; ``hand_over(key, value)``
    passes a setting still needed to one of them."""
    done = []
    for key, old in changed.items():
        if key in BRIDGE_NF:
            if any(n.get("bridge_nf_off") for n in others_need):
                if hand_over is not None:
                    hand_over(key, old)
                continue
            value = old
        elif key == TCP_ALLOWED:
            keep = [n["tcp_cc"] for n in others_need if n.get("tcp_cc")]
            found = old.split()
            current = (read(key) or "").split()
            still = [c for c in current if c in keep and c not in found]
            if still and hand_over is not None:
                hand_over(key, old)  # the last run that needs them takes them away
            value = " ".join(found + still)
        else:
            continue
        with contextlib.suppress(OSError):
            write(key, value)
            done.append(f"{key}={value}")
    return done
