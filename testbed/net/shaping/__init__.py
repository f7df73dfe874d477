"""Shaping backends that are not plain kernel qdiscs: the userspace link process."""
