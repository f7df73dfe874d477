"""Mininet build, addressing, shaping backends, trace replay, probe, cleanup."""
