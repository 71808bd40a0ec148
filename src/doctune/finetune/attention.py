"""Padding-free attention: several samples in one row, none attending to another.

A padding-free batch is one row of samples laid end to end whose `position_ids` restart at 0 at every sample
(data.flatten_batch). `varlen_sdpa` finds those restarts and runs causal SDPA on each sample's span alone, so the
model computes no padding and no cross-sample attention; the logits equal running each sample separately.
Registered with transformers' AttentionInterface as "doctune_varlen"; rows without restarts, masks or caches
(generation) go through plain SDPA unchanged.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Any

import torch

VARLEN = "doctune_varlen"

# The bounds of the last row seen, keyed by its position_ids tensor: every layer of one forward pass gets the same
# tensor, so the restarts are found once per batch, not once per layer (a weak reference: no stale hit when a
# later batch's tensor reuses the memory).
_last_bounds: tuple[weakref.ref, list[int]] | None = None


def sample_bounds(position_ids: torch.Tensor) -> list[int]:
    """Start offsets of the samples in one row, plus its length.

    >>> sample_bounds(torch.tensor([0, 1, 2, 0, 1, 0]))
    [0, 3, 5, 6]
    """
    restarts = torch.nonzero(position_ids[1:] - position_ids[:-1] != 1).flatten().add(1).tolist()
    return [0, *restarts, int(position_ids.shape[0])]


def varlen_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function (query/key/value: batch, heads, length, head_dim)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.pop("position_ids", None)
    packed = (
        attention_mask is None
        and position_ids is not None
        and query.shape[0] == 1
        and query.shape[2] == key.shape[2]
        and query.shape[2] > 1
    )
    if not packed:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    bounds = _row_bounds(position_ids)
    outputs = [
        sdpa_attention_forward(
            module,
            query[:, :, start:end],
            key[:, :, start:end],
            value[:, :, start:end],
            None,
            dropout=dropout,
            scaling=scaling,
            is_causal=True,
        )[0]
        for start, end in itertools.pairwise(bounds)
    ]
    return torch.cat(outputs, dim=1), None


def _row_bounds(position_ids: torch.Tensor) -> list[int]:
    """sample_bounds of a (1, length) position_ids tensor, computed once per tensor."""
    global _last_bounds
    if _last_bounds is not None and _last_bounds[0]() is position_ids:
        return _last_bounds[1]
    bounds = sample_bounds(position_ids[0])
    _last_bounds = (weakref.ref(position_ids), bounds)
    return bounds


def register() -> str:
    """Make "doctune_varlen" a name `model.set_attn_implementation` accepts; returns the name."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, varlen_sdpa)
    return VARLEN
