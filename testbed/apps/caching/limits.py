"""Bounds of the caching commands' numeric flags (checked by ``testbed.cli`` with the usual messages).

Defined in :mod:`testbed.spec.caching`, where the suite validator checks the caching suites'
parameters against the same bounds.
"""

from __future__ import annotations

from testbed.spec.caching import CAPACITY_MB, RATE, REQUESTS, SHARED_LAYERS, VARIANTS, WINDOW, ZIPF

__all__ = ["CAPACITY_MB", "RATE", "REQUESTS", "SHARED_LAYERS", "VARIANTS", "WINDOW", "ZIPF"]
