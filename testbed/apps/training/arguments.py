"""The flags of ``testbed train``, which ``testbed/cli.py`` mounts (no torch here: the parser is light)."""

from __future__ import annotations

import argparse

from testbed.apps.training import defaults
from testbed.apps.training.schedule import SCHEDULES
from testbed.spec.check import Range, flag_choice, flag_number
from testbed.spec.errors import SpecError, got
from testbed.spec.options import CODECS

STEPS = Range(ge=1, le=1_000_000, integer=True)
BATCH = Range(ge=1, le=4096, integer=True)
SEQ = Range(ge=1, le=8192, integer=True, note="the model's context")
LR = Range(gt=0, le=1)
RANK = Range(ge=1, le=4096, integer=True)
ALPHA = Range(gt=0, le=1e6)
SEED = Range(ge=0, le=2**32 - 1, integer=True)
MICRO = Range(ge=1, le=4096, integer=True)
RATIO = Range(ge=0, le=1)
STEPS_OR_NONE = Range(ge=0, le=1_000_000, integer=True)
SCHEMES = ("sl", "sfl", "psl")


def _list(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"must be a comma-separated list (got {text!r})")
    return items


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("topo")
    p.add_argument("--placement", required=True,
                   help="device first, then one stage per hop: phone=0:4,edge1=4:20,edge2=20:30")
    p.add_argument("--scheme", type=flag_choice(SCHEMES), choices=SCHEMES, default="sl",
                   help="sl: one device; sfl: devices in parallel, their adapters averaged (FedAvg) every "
                        "--aggregate-every steps; psl: in parallel, never averaged")
    p.add_argument("--clients", type=_list, default=[], metavar="NODE[,NODE...]",
                   help="the devices (default: the first --placement entry, which may be a pattern: "
                        "dev*=0:4)")
    p.add_argument("--aggregate-every", type=flag_number(STEPS), default=1, metavar="K")
    p.add_argument("--steps", type=flag_number(STEPS), default=defaults.STEPS)
    p.add_argument("--batch", type=flag_number(BATCH), default=defaults.BATCH)
    p.add_argument("--seq", type=flag_number(SEQ), default=defaults.SEQ, help="tokens per sequence")
    p.add_argument("--lr", type=flag_number(LR), default=defaults.LR, help="AdamW learning rate")
    p.add_argument("--rank", type=flag_number(RANK), default=defaults.RANK, help="LoRA rank")
    p.add_argument("--alpha", type=flag_number(ALPHA), default=float(defaults.ALPHA), help="LoRA alpha")
    p.add_argument("--targets", type=_list, default=list(defaults.TARGET_MODULES),
                   help="modules that get adapters, comma-separated (default: every linear of a block)")
    p.add_argument("--seed", type=flag_number(SEED), default=defaults.SEED)
    p.add_argument("--micro-batches", type=flag_number(MICRO), default=1,
                   help="micro-batches per step (must divide --batch)")
    p.add_argument("--schedule", type=flag_choice(SCHEDULES), choices=SCHEDULES, default="gpipe")
    p.add_argument("--codec", type=flag_choice(CODECS), choices=CODECS, default="fp32",
                   help="activations, downstream")
    p.add_argument("--grad-codec", type=flag_choice(CODECS), choices=CODECS, default="fp32",
                   help="activation gradients, upstream")
    p.add_argument("--freeze-client", type=flag_number(RATIO), default=0.0,
                   help="share of the device's layers without adapters (the lowest ones), 0..1")
    p.add_argument("--freeze-server", type=flag_number(RATIO), default=0.0,
                   help="share of the stage servers' layers without adapters (the lowest ones), 0..1")
    p.add_argument("--no-eval", action="store_true", help="skip the held-out perplexity before and after")
    p.add_argument("--data", type=_list, default=[], metavar="FILE[,FILE...]",
                   help="UTF-8 text files or built-in corpora (fortunes:NAME, licenses:NAME) to train on; "
                        "default: the first built-in corpus")
    p.add_argument("--local", action="store_true", help="the same training in one process (the reference)")
    p.add_argument("--loopback", action="store_true",
                   help="run the node programs on this machine's loopback, without the topology's links")
    p.add_argument("--model", default=None, help="checkpoint directory or GGUF file (default: SmolLM2-135M)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="result.json, adapters/ (peft's format) and logs/ (default: results/train-DATE-TIME)")
    p.add_argument("--checkpoint-every", type=flag_number(STEPS_OR_NONE), default=0, metavar="K",
                   help="write every program's adapters, optimizer state and data cursor to "
                        "--out/checkpoints after every K steps (0: never)")
    p.add_argument("--drop-after", type=flag_number(Range(ge=0, le=86400)), default=0.0, metavar="S",
                   help="sfl/psl with one stage server: a device that sends nothing for S seconds in a "
                        "round is left out and the round completes with the others (0: wait for it)")
    p.add_argument("--head-on-device", action="store_true",
                   help="U-shaped: the device also holds the final norm, the head and the loss, so the "
                        "labels never leave it (the last server's output comes back to it)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its latest complete checkpoint")
    p.add_argument("--json", action="store_true")


def check(args: argparse.Namespace) -> None:
    """Flags that depend on each other; one SpecError line."""
    if args.batch % args.micro_batches:
        raise SpecError("train", "--micro-batches",
                        f"must divide --batch ({args.batch}) (got {args.micro_batches})")
    if args.resume and not args.out:
        raise SpecError("train", "--resume", "needs --out, the folder of the run to continue (got none)")
    if args.head_on_device and args.drop_after:
        raise SpecError("train", "--drop-after", "goes without --head-on-device: a device left out of a "
                        f"round would hold its micro-batches' loss (got {args.drop_after:g})")
    if args.local and args.loopback:
        raise SpecError("train", "--loopback", "goes without --local (got both)")
    check_data(args)


def check_data(args: argparse.Namespace) -> None:
    """``--data``: every file readable UTF-8 text with something in it, every built-in corpus found, and
    one file per device or one for all, before anything starts (``testbed.spec.corpora``)."""
    from pathlib import Path

    from testbed.spec import corpora

    builtins = corpora.builtin_corpora()
    for entry in args.data:
        corpora.check_entry(entry, Path(entry).expanduser(), "train", "--data", builtins)
    devices = len(args.clients) or _pattern_devices(args)
    problem = corpora.count_problem(len(args.data), devices) if devices else None
    if problem:
        raise SpecError("train", "--data", f"{problem} {got(','.join(args.data))}")


def check_texts(model_dir, data: list[str], devices: int, batch: int, seq: int) -> None:
    """``--data`` tokenized as the devices will (the parent's tokenizer, before any program starts): a
    text too short for one batch is ``train: --data: NAME: too short ...`` (exit 2), not a device's
    traceback."""
    from testbed.apps.training.local import client_data

    try:
        client_data(model_dir, data, devices, batch, seq)
    except SpecError as e:
        raise SpecError("train", "--data", f"{e.file}: {e.message}") from None


def _pattern_devices(args: argparse.Namespace) -> int:
    """The devices of the run without ``--clients``: 1, or those of the topology that the first
    ``--placement`` entry's pattern (``dev*=0:4``) matches (0: unknown here, the run checks them)."""
    import fnmatch

    pattern = args.placement.partition(",")[0].partition("=")[0]
    if not any(ch in pattern for ch in "*?["):
        return 1
    from testbed.spec.topology import load_topology

    try:
        topo = load_topology(args.topo)
    except SpecError:
        return 0  # the topology's own error comes next, from the run
    return sum(1 for n in topo.hosts() if n.role == "device" and fnmatch.fnmatch(n.name, pattern))
