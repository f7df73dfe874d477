"""Training messages: activations and their gradients through the codecs, statistics rows."""

from __future__ import annotations

import torch

from testbed.model.codecs import get_codec
from testbed.wire.message import DType, Kind, Message, WireError, train_hidden

# one row of step statistics per stage (TRAIN_STATS); times are CLOCK_MONOTONIC seconds, which the
# processes of one emulated network share (one kernel), so sends and receipts of two stages compare
STAT_FIELDS = ("fwd_ms", "bwd_ms", "codec_ms", "peak_act_bytes", "loss", "bytes_from_up",
               "bytes_from_down", "t_recv_fwd", "t_send_fwd", "t_recv_bwd", "t_send_bwd", "step_ms",
               "clients_dropped", "smashed_bytes_saved", "smashed_reused",
               # U-shaped (--head-on-device): the device's head compute, and the bytes of the extra
               # crossing, which bytes_from_down (TRAIN_OUTPUT) and bytes_from_up (TRAIN_HEAD_GRAD) include
               "head_fwd_ms", "head_bwd_ms", "bytes_output_from_down", "bytes_head_grad_from_up")
K = len(STAT_FIELDS)
F = {name: i for i, name in enumerate(STAT_FIELDS)}


def encode(kind: Kind, session: int, step: int, micro: int, x: torch.Tensor, codec: str) -> Message:
    return train_hidden(kind, session, step, micro, tuple(x.shape), codec, get_codec(codec).encode(x))


def check_hidden(msg: Message, hidden: int) -> None:
    """Activations (or their gradient) of shape [B, T, hidden] with a codec, or a WireError."""
    if msg.dtype != DType.HIDDEN or msg.codec is None or len(msg.shape) != 3 or msg.shape[2] != hidden:
        raise WireError(f"{msg.kind.name}: expected activations [B, T, {hidden}], got {msg.shape}")


def decode(msg: Message, hidden: int) -> torch.Tensor:
    """The float32 tensor [B, T, hidden] of a TRAIN_FORWARD / TRAIN_BACKWARD / TRAIN_OUTPUT /
    TRAIN_HEAD_GRAD message."""
    check_hidden(msg, hidden)
    assert msg.codec is not None
    return get_codec(msg.codec).decode(msg.payload, msg.shape)


def labels(msg: Message, vocab: int) -> torch.Tensor:
    if msg.dtype != DType.INT64 or len(msg.shape) != 2:
        raise WireError(f"labels must be token ids [B, T], got {msg.shape}")
    t = msg.tensor()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= vocab):
        raise WireError("label id out of range")
    return t
