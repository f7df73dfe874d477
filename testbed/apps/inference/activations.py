"""Activations on the wire: encode hidden states into a FORWARD message, decode them from one."""

from __future__ import annotations

import torch

from testbed.model.codecs import get_codec
from testbed.wire.message import DType, Message, WireError, forward_hidden


def hidden_message(session: int, step: int, pos: int, x: torch.Tensor, codec: str, kv_cache: bool) -> Message:
    """A FORWARD message carrying ``x`` encoded by ``codec``."""
    return forward_hidden(session, step, pos, tuple(x.shape), codec, get_codec(codec).encode(x), kv_cache)


def hidden_states(msg: Message) -> torch.Tensor:
    """The float32 activations of a parsed HIDDEN message."""
    if msg.dtype != DType.HIDDEN or msg.codec is None:
        raise WireError(f"{msg.dtype.name} payload is not hidden states")
    return get_codec(msg.codec).decode(msg.payload, msg.shape)
