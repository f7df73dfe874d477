"""How long a test waits for real programs before it calls them hung.

Deadlines in tests guard against hangs; they measure nothing.  Under QEMU's TCG (the VM where
KVM cannot run a guest, the test guest) Python runs 10-15x slower and floating point, emulated
in software, ~400x: the node programs of a tiny training run took longer than these deadlines
to import torch and reach their fourth step.  There ``patient`` makes every deadline ten times longer.
"""

from __future__ import annotations

import functools
import subprocess


@functools.cache
def emulated_cpu() -> bool:
    """Whether this machine is a QEMU guest without KVM (systemd-detect-virt says ``qemu`` for TCG,
    ``kvm`` under KVM)."""
    try:
        out = subprocess.run(["systemd-detect-virt"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.strip() == "qemu"


def patient(seconds: float) -> float:
    """``seconds`` here; ten times that on an emulated CPU."""
    return seconds * (10 if emulated_cpu() else 1)
