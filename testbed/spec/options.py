"""The closed sets of choices a user can name, in one place (CLI flags, topologies, suites, nodes).

The modules that implement a choice check against these lists; a test keeps them in step.
"""

from __future__ import annotations

SHAPERS = ("auto", "kernel", "userspace")  # link shaping backend; auto: kernel where netem exists
RUNTIMES = ("process", "docker")  # where a node runs
QUANTS = ("none", "bf16", "int8", "int4")  # weight formats of a shard
CODECS = ("fp32", "fp16", "bf16", "int8")  # activation encodings on the wire
ROLES = ("device", "edge", "cloud", "cell")  # topology node roles; a cell is a shared L2 segment
TCP_CCS = ("cubic", "reno", "bbr")  # congestion control of a topology's hosts
TRACE_FORMATS = ("mahimahi", "csv")  # channel trace files
BASELINES = ("on-device", "edge-offload", "cloud-offload")  # the placements every suite compares
SWEEP_MODES = ("cartesian", "zip")  # how a suite combines its swept parameters
SECURITY = ("none", "curve")  # node traffic: plain ZeroMQ, or CurveZMQ with per-run keys
CACHE_POLICIES = ("lru", "lfu", "block-lru", "trimcaching", "random", "optimal")  # edge model caching
CATALOGUE_BASES = ("tiny", "smollm2")  # the base model a catalogue is built from
TRAIN_SCHEMES = ("sl", "sfl", "psl")  # split training: taking turns, federated, parallel
TRAIN_SCHEDULES = ("gpipe", "1f1b")  # pipeline schedules of multi-hop training
WORKLOAD_KINDS = ("inference", "training", "caching")  # what a suite's points run
CACHE_MODES = ("emulated", "replay")  # real bytes over emulated links, or analytic delivery times
