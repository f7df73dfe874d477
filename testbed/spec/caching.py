"""Bounds of the edge-caching values a user gives: ``cache-run`` and ``catalogue build`` flags
(checked by ``testbed.cli``) and the parameters of caching suites (checked by ``testbed.spec.suite``).

One definition for both, so a flag and the suite parameter of the same name accept the same values.
"""

from __future__ import annotations

from testbed.spec.check import Range

VARIANTS = Range(ge=0, le=10_000, integer=True)
SHARED_LAYERS = Range(ge=0, le=1024, integer=True)  # and below the base's layer count
CAPACITY_MB = Range(gt=0, le=10_000_000, note="10 TB")  # and at least the largest model
CAPACITY_BASES = Range(gt=0, le=100_000)  # capacity in base models; and at least the largest model
ZIPF = Range(ge=0, le=10)
REQUESTS = Range(ge=1, le=10_000_000, integer=True)
WINDOW = Range(ge=1, le=10_000_000, integer=True)
RATE = Range(gt=0, le=1_000_000)
