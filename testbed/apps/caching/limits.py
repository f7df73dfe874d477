"""Bounds of the caching commands' numeric flags (checked by ``testbed.cli`` with the usual messages)."""

from __future__ import annotations

from testbed.spec.check import Range

VARIANTS = Range(ge=0, le=10_000, integer=True)
SHARED_LAYERS = Range(ge=0, le=1024, integer=True)  # and below the base's layer count
CAPACITY_MB = Range(gt=0, le=10_000_000, note="10 TB")  # and at least the largest model
ZIPF = Range(ge=0, le=10)
REQUESTS = Range(ge=1, le=10_000_000, integer=True)
WINDOW = Range(ge=1, le=10_000_000, integer=True)
RATE = Range(gt=0, le=1_000_000)
