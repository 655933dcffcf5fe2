"""ModelOpt's GPTQ-lite over a few decoder layers at a time, so its Hessians fit a memory budget.

ModelOpt's `gptq_lite` collects one `in_features x in_features` fp32 Hessian per quantized linear
in one calibration pass and only then updates the weights: on SmolLM2 the Hessians are ~0.8x the
fp32 weights (the FFN's down projection alone 1536^2 per layer), which made GPTQ-lite PTQ peak at
2.2x the model. Here the same ModelOpt calibration (`mtq.calibrate` with its gptq method) runs once
per group of decoder layers, with the weight quantizers of every other layer switched off, so only
the group's Hessians exist at a time.

What changes against one pass: a group's Hessians see the earlier groups' weights already
GPTQ-updated (the order true GPTQ uses) instead of only rounded. The weights those earlier layers
compute with are the updated, already-quantized values, so switching their quantizers off does not
change what they compute. At PP=1 a pass stops after the group's last layer (the later layers
cannot change the group's inputs), so P passes cost about (P + 1) / 2 calibration forwards.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch

from nemo_optim import compat, runtime
from nemo_optim.progress import progress

ForwardLoop = Callable[[torch.nn.Module], None]


def _weight_quantized_linears(module: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules under `module` whose weight quantizer is on (what ModelOpt's GPTQ updates)."""
    return [m for m in module.modules()
            if getattr(m, "weight_quantizer", None) is not None and m.weight_quantizer.is_enabled
            and getattr(m, "weight", None) is not None and m.weight.dim() == 2]


def hessian_bytes(layer: torch.nn.Module) -> int:
    """fp32 bytes of the Hessians GPTQ keeps for `layer`'s quantized linears (in_features^2 each)."""
    return sum(4 * m.weight.shape[-1] ** 2 for m in _weight_quantized_linears(layer))


def layers_per_pass(layers: list[torch.nn.Module], budget_bytes: float) -> int:
    """The most consecutive layers whose Hessians fit `budget_bytes` (at least one), agreed by
    every rank (each pass runs collectives, so all ranks must run the same passes)."""
    largest = max((hessian_bytes(layer) for layer in layers), default=0)
    count = 2**31 - 1 if largest == 0 else max(1, int(budget_bytes // largest))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        box = torch.tensor([count], dtype=torch.int64, device=runtime.device())
        torch.distributed.all_reduce(box, op=torch.distributed.ReduceOp.MIN)
        count = int(box.item())
    return count


@contextlib.contextmanager
def _only_weight_quantizers_of(model: torch.nn.Module, kept: list[torch.nn.Module]) -> Iterator[None]:
    """Weight quantizers of all quantized linears but `kept` switched off, back on after."""
    kept_ids = {id(m) for m in kept}
    switched = [m for m in _weight_quantized_linears(model) if id(m) not in kept_ids]
    for module in switched:
        module.weight_quantizer.disable()
    try:
        yield
    finally:
        for module in switched:
            module.weight_quantizer.enable()


@contextlib.contextmanager
def _decoder_truncated(decoder: torch.nn.Module, end: int) -> Iterator[None]:
    """Forward passes run the first `end` decoder layers only (megatron's TransformerBlock runs
    `self.layers` in order; the final norm after them is cheap)."""
    layers = decoder.layers
    decoder.layers = torch.nn.ModuleList(list(layers)[:end])
    try:
        yield
    finally:
        decoder.layers = layers


def _decoder_layers(model: torch.nn.Module) -> tuple[torch.nn.Module | None, list[torch.nn.Module]]:
    decoder = getattr(model, "decoder", None)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not all(hasattr(layer, "layer_number") for layer in layers):
        return None, []
    return decoder, list(layers)


def calibrate_gptq_in_passes(model: torch.nn.Module, gptq_step: dict[str, Any], forward_loop: ForwardLoop,
                             budget_fraction: float) -> int:
    """`mtq.calibrate(model, gptq_step, forward_loop)` over groups of decoder layers whose Hessians
    fit `budget_fraction` of this process's parameter bytes (0, or a model without megatron decoder
    layers: one pass, ModelOpt's own behaviour). Returns the number of passes run.

    Groups are cut by the global layer number: with as many layers per pass, a pipeline-parallel
    run forms the same groups as one process (a stage without the group's layers only forwards).
    The budget is per process (what bounds its memory), so a large model split over stages may
    take more layers per pass than one process would. Only at PP=1 is a pass's forward stopped
    after the group."""
    import modelopt.torch.quantization as mtq
    from megatron.core import parallel_state

    decoder, layers = _decoder_layers(model)
    if budget_fraction <= 0 or decoder is None:
        mtq.calibrate(model, gptq_step, forward_loop)
        return 1
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    per_pass = layers_per_pass(layers, budget_fraction * model_bytes)
    passes = math.ceil(model.config.num_layers / per_pass)
    single_stage = parallel_state.get_pipeline_model_parallel_world_size() == 1
    in_layers = {id(m) for layer in layers for m in _weight_quantized_linears(layer)}
    outside = [m for m in _weight_quantized_linears(model) if id(m) not in in_layers]  # e.g. a quantized output layer
    if passes > 1:
        runtime.print0(f"GPTQ-lite: {passes} passes of {per_pass} decoder layers (their Hessians within "
                       f"{budget_fraction:.0%} of the model's weight bytes)")
    for index in progress(range(passes), description="GPTQ-lite passes", disable=passes == 1):
        group = [layer for layer in layers if (layer.layer_number - 1) // per_pass == index]
        end = max((i + 1 for i, layer in enumerate(layers) if (layer.layer_number - 1) // per_pass <= index), default=0)
        truncated = (_decoder_truncated(decoder, end) if single_stage and 0 < end < len(layers)
                     else contextlib.nullcontext())
        group_linears = [m for layer in group for m in _weight_quantized_linears(layer)]
        with _only_weight_quantizers_of(model, group_linears), truncated:
            _calibrate_in_step(model, gptq_step, forward_loop, group_linears)
    if outside:
        with _only_weight_quantizers_of(model, outside):
            mtq.calibrate(model, gptq_step, forward_loop)
        passes += 1
    return passes


def _calibrate_in_step(model: torch.nn.Module, gptq_step: dict[str, Any], forward_loop: ForwardLoop,
                       group_linears: list[torch.nn.Module]) -> None:
    """`mtq.calibrate`, with a pipeline stage that holds none of the pass's layers running the
    forward pass ModelOpt skips there: its gptq (>= 0.44) returns before the Hessian pass when the
    stage has no enabled weight quantizer, and the next stage would wait for (or, with gloo, later
    receive) the activations of a forward that never ran."""
    import modelopt.torch.quantization as mtq

    from megatron.core import parallel_state

    mtq.calibrate(model, gptq_step, forward_loop)
    if (not group_linears and compat.gptq_skips_hessian_pass_without_layers()
            and parallel_state.get_pipeline_model_parallel_world_size() > 1):
        forward_loop(model)


def _steps(algorithm: Any) -> list[Any]:
    if algorithm is None:
        return []
    return list(algorithm) if isinstance(algorithm, list) else [algorithm]


def _as_algorithm(steps: list[Any]) -> Any:
    return None if not steps else steps[0] if len(steps) == 1 else steps


def quantize(model: torch.nn.Module, modelopt_config: dict[str, Any], forward_loop: ForwardLoop,
             gptq_method: str, hessian_budget: float) -> torch.nn.Module:
    """`mtq.quantize(model, modelopt_config, forward_loop)`, with a `gptq_method` calibration step
    run by `calibrate_gptq_in_passes` under `hessian_budget` (a fraction of the weight bytes)."""
    import modelopt.torch.quantization as mtq

    steps = _steps(modelopt_config.get("algorithm"))
    methods = [step if isinstance(step, str) else (step or {}).get("method") for step in steps]
    if gptq_method not in methods or hessian_budget <= 0:
        return mtq.quantize(model, modelopt_config, forward_loop)
    at = methods.index(gptq_method)
    model = mtq.quantize(model, {**modelopt_config, "algorithm": _as_algorithm(steps[:at])}, forward_loop)
    gptq_step = steps[at] if isinstance(steps[at], dict) else {"method": steps[at]}
    calibrate_gptq_in_passes(model, gptq_step, forward_loop, hessian_budget)
    if steps[at + 1:]:
        mtq.calibrate(model, _as_algorithm(steps[at + 1:]), forward_loop)
    return model
