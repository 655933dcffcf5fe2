"""The model's sharded state dict: what dist-checkpointing saves, loads and reshards to another TP/PP.

One fix over `model.sharded_state_dict()`: ModelOpt's per-channel (and per-block) weight scales of a
gated MLP's `linear_fc1` are resharded the way megatron-core reshards that layer's weight.

megatron-core keeps a gated (SwiGLU) `linear_fc1` at TP=n as n shards of [gate_i; up_i] and saves it
with `apply_swiglu_sharded_factory`, so the checkpoint holds [gate; up] whatever TP wrote it. ModelOpt's
MLP plugin means to do the same for the quantizer scales, but its key patterns are matched from the
start of the full key (`re.match`: ModelOpt 0.43 to 0.47) and never apply: a checkpoint calibrated at
TP=2 held [gate_0; up_0; gate_1; up_1] and loaded at TP=1 (or one calibrated at TP=1 loaded at TP=2)
scaled half of the MLP's channels with another channel's scale.
"""

from __future__ import annotations

import re

import torch

_GATED_FC1_SCALE = re.compile(r"\.mlp\.linear_fc1\.weight_quantizer\.(\d+\.)*_(amax|scale)$")


def sharded_state_dict(model: torch.nn.Module, prefix: str = "") -> dict:
    """`model.sharded_state_dict(prefix=prefix)` with gated `linear_fc1` weight scales in gate/up layout."""
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

    state = model.sharded_state_dict(prefix=prefix)
    if not getattr(getattr(model, "config", None), "gated_linear_unit", False):
        return state
    for key, item in state.items():
        # per-tensor scales are 1-D and replicated; per-channel / per-block ones are rows x (1 | blocks)
        if isinstance(item, ShardedTensor) and item.data.dim() == 2 and _GATED_FC1_SCALE.search(key):
            leading = tuple((axis, item.global_offset[axis], item.axis_fragmentations[axis])
                            for axis in range(item.prepend_axis_num))
            state[key] = apply_swiglu_sharded_factory(item, leading, singleton_local_shards=False)
    return state
