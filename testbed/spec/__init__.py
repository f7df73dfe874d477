"""Topology and experiment schemas, validation errors, channel-trace file formats."""
