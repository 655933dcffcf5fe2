"""Structured pruning of a megatron GPT model: drop layers, or Minitron (ModelOpt
`mcore_minitron`: importance on calibration text, then width/depth cuts to the targets or a
`target_params` search), then a rebuild at the new shapes that fails loudly on any weight whose
shape is not what the pruned config says. The `prune` stage (nemo_optim.stages.prune) loads,
calls `prune_language_model` and saves.
"""

import dataclasses
import math
from pathlib import Path
from typing import Callable, Optional

import torch

from nemo_optim import runtime
from nemo_optim.cpu.pruning_norms import register_cpu_norms_for_pruning
from nemo_optim.models.config import GPTModelConfig, build_gpt_model
from nemo_optim.pruning.config import PruningConfig, PruningConfigError


class PruningResultError(RuntimeError):
    """The pruned weights do not have the shapes the pruned config claims."""


def _divisor(original: int, target: Optional[int]) -> int:
    # ModelOpt only offers multiples of its divisor as choices; a target off that grid would be
    # silently ignored, so the grid is made to contain the target.
    return math.gcd(original, target) if target else original


def _search_divisor(size: int) -> int:
    # the target_params search grid: eighths of the original size (or every size when small)
    return size // 8 if size % 8 == 0 and size >= 64 else 1


def check_minitron_available() -> None:
    from nemo_optim import compat

    if compat.minitron_needs_transformer_engine():
        raise PruningConfigError(
            f"pruning_config: Minitron pruning with nvidia-modelopt {compat.installed('nvidia-modelopt')} (>= 0.44) "
            f"prunes only Transformer Engine layers (transformer_impl=\"transformer_engine\", on a GPU) and this "
            f"stage builds megatron's local layers; use pruning_config.drop_layers, or nvidia-modelopt 0.43 "
            f"(requirements/previous-constraints.txt).")


def drop_decoder_layers(model: torch.nn.Module, layers: list[int]) -> None:
    """Removes decoder `layers` (numbered 1..num_layers over the whole model) from this pipeline
    stage's share and renumbers the kept ones, as ModelOpt's `drop_mcore_language_model_layers`
    does; ModelOpt >= 0.44 imports that module only with Transformer Engine installed."""
    from megatron.core import parallel_state

    dropped = set(layers)
    kept = [layer for layer in model.decoder.layers if layer.layer_number not in dropped]
    group = parallel_state.get_pipeline_model_parallel_group()
    counts = [torch.zeros(1, dtype=torch.int64) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(counts, torch.tensor([len(kept)], dtype=torch.int64), group=group)
    first = 1 + sum(int(c) for c in counts[:parallel_state.get_pipeline_model_parallel_rank()])
    for offset, layer in enumerate(kept):
        layer.layer_number = first + offset
    model.decoder.layers = torch.nn.ModuleList(kept)
    model.config.num_layers = sum(int(c) for c in counts)
    runtime.print0(f"dropped decoder layers {sorted(dropped)}: {model.config.num_layers} left")


def prune_language_model(
    model: torch.nn.Module,
    model_config: GPTModelConfig,
    pruning_config: PruningConfig,
    forward_loop: Optional[Callable[[torch.nn.Module], None]] = None,
    scores_path: Optional[str] = None,
    score_func: Optional[Callable[[torch.nn.Module], float]] = None,
) -> tuple[torch.nn.Module, GPTModelConfig]:
    """Prunes `model` and returns a fresh, static model with the pruned config.

    `score_func(model) -> float` (higher is better) ranks the candidates of a `target_params`
    search."""
    pruning_config.validate_against(model_config)
    if pruning_config.drop_layers:
        drop_decoder_layers(model, pruning_config.drop_layers)
    else:
        check_minitron_available()
        import modelopt.torch.prune as mtp
        from modelopt.torch.prune.plugins.mcore_minitron import get_mcore_minitron_config

        if forward_loop is None and not (scores_path and any(Path(scores_path).glob("rank*.pth"))):
            raise ValueError("Minitron pruning needs a forward_loop (or cached scores in scores_path).")
        if model_config.transformer_impl == "local":
            register_cpu_norms_for_pruning()
        search_config = {"forward_loop": forward_loop,
                         # a path without a suffix is a directory to ModelOpt: one rank<N>.pth per rank
                         "scores_path": str(Path(scores_path)) + "/" if scores_path else None}
        if pruning_config.target_params is not None:
            if score_func is None:
                raise ValueError("a target_params search needs a score_func to rank its candidates.")
            constraints = {"params": pruning_config.target_params}
            search_config.update(score_func=score_func, max_width_pruning=pruning_config.max_width_pruning,
                                 max_depth_pruning=pruning_config.max_depth_pruning, top_k=pruning_config.top_k)
            mode_config = get_mcore_minitron_config(
                hidden_size_divisor=_search_divisor(model_config.hidden_size),
                ffn_hidden_size_divisor=_search_divisor(model_config.ffn_hidden_size), num_layers_divisor=1)
        else:
            export_config = pruning_config.export_config(model_config)
            constraints = {"export_config": export_config}
            mode_config = get_mcore_minitron_config(
                hidden_size_divisor=_divisor(model_config.hidden_size, export_config.get("hidden_size")),
                ffn_hidden_size_divisor=_divisor(model_config.ffn_hidden_size, export_config.get("ffn_hidden_size")),
                num_layers_divisor=1,
            )
        model.eval()
        model, _ = mtp.prune(model, mode=[("mcore_minitron", mode_config)], constraints=constraints,
                             dummy_input=None, config=search_config)
    if pruning_config.target_params is not None:
        # the search chose the shapes; ModelOpt wrote them into the model's megatron config
        chosen = {name: getattr(model.config, name)
                  for name in ("hidden_size", "ffn_hidden_size", "num_attention_heads", "num_layers")}
        pruned_config = dataclasses.replace(model_config, **chosen)
        if pruned_config.num_parameters() > pruning_config.target_params:
            raise PruningResultError(f"the search chose {chosen} with {pruned_config.num_parameters()} parameters, "
                                     f"over target_params={pruning_config.target_params:.4g}.")
        return rebuild_static(model, pruned_config), pruned_config
    pruned_config = pruning_config.pruned_model_config(model_config)
    return rebuild_static(model, pruned_config), pruned_config


def rebuild_static(pruned: torch.nn.Module, config: GPTModelConfig) -> torch.nn.Module:
    """A plain megatron model built from `config`, holding `pruned`'s weights; fails loudly if
    any weight's shape disagrees with the config (the silent-unpruned-checkpoint bug)."""
    static = build_gpt_model(config, initialize=False)  # every weight is copied below (missing ones fail)
    state = {k: v for k, v in pruned.state_dict().items() if not k.endswith("_extra_state")}
    expected = {k: v.shape for k, v in static.state_dict().items() if not k.endswith("_extra_state")}
    mismatched = [f"{k}: {tuple(state[k].shape)} != {tuple(shape)}" for k, shape in expected.items()
                  if k in state and state[k].shape != shape]
    missing = sorted(set(expected) - set(state))
    if mismatched or missing:
        raise PruningResultError(
            "pruned weights do not match the pruned config "
            f"(hidden {config.hidden_size}, ffn {config.ffn_hidden_size}, heads {config.num_attention_heads}, "
            f"layers {config.num_layers}): " + "; ".join(mismatched[:5] + [f"missing {k}" for k in missing[:5]])
        )
    static.load_state_dict(state, strict=False)
    from megatron.core import parallel_state

    if (parallel_state.get_tensor_model_parallel_world_size() == 1
            and parallel_state.get_pipeline_model_parallel_world_size() == 1):
        count = sum(p.numel() for p in static.parameters())
        if count != config.num_parameters():
            raise PruningResultError(f"pruned model has {count} parameters, "
                                     f"its config implies {config.num_parameters()}.")
    return static
