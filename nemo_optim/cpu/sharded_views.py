"""megatron's dist-checkpoint writer on CPU tensors: what it would copy is handed over as it is."""

from __future__ import annotations


def views_handed_over_whole(sharded_state_dict: dict) -> None:
    """megatron's checkpoint writer clones every CPU tensor that is a view of a larger one, all of them
    before it writes anything: a SwiGLU fc1 weight is saved as its two halves, so 40% of a Llama's
    weights were copied at once (0.2 GiB for SmolLM2: the ptq stage's peak). Each contiguous view is
    handed over instead as a tensor over just its slice of the storage: the same memory (the slice
    keeps the parameter's storage alive), which the writer takes as whole, so nothing is copied and
    the model is not touched. Applies `sharded_state_dict`'s factories first."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    apply_factories(sharded_state_dict)
    for item in nested_values(sharded_state_dict):
        data = item.data if isinstance(item, ShardedTensor) else None
        if data is None or data.device.type != "cpu" or not data.is_contiguous():
            continue  # (GPU tensors are copied to the host by the writer anyway)
        nbytes, storage = data.numel() * data.element_size(), data.untyped_storage()
        if storage.nbytes() > nbytes:
            start = data.storage_offset() * data.element_size()
            item.data = data.new_empty(0).set_(storage[start:start + nbytes], 0, data.size(), data.stride())
