"""The closed sets of choices a user can name, in one place (CLI flags, topologies, suites, nodes).

The modules that implement a choice check against these lists; a test keeps them in step.
"""

from __future__ import annotations

SHAPERS = ("auto", "kernel", "userspace")  # link shaping backend; auto: kernel where netem exists
RUNTIMES = ("process", "docker")  # where a node runs
QUANTS = ("none", "bf16", "int8", "int4")  # weight formats of a shard
CODECS = ("fp32", "fp16", "bf16", "int8")  # activation encodings on the wire
