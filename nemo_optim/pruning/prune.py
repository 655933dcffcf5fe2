"""The `prune` stage: load -> (importance estimation) -> prune -> rebuild at the new shapes ->
check shapes and parameter count -> save natively -> optionally export to HF.

Steps:
  1. check the pruning targets against the model's config (before any forward pass),
  2. drop_layers: remove them; otherwise Minitron (ModelOpt `mcore_minitron`): estimate
     importance on calibration text (cached in `scores_path` when given), prune to the targets,
  3. build a fresh megatron model with the pruned config and load the pruned weights into it
     (strict: any tensor whose shape is not what the config says fails here),
  4. check the parameter count against the config's formula, save, export.

CPU:
    python -c "from nemo_optim.pruning.prune import prune; from nemo_optim.pruning.config import PruningConfig; \
prune(nemo_checkpoint='smollm2-135m-instruct', save_path='/tmp/pruned', pruning_config=PruningConfig(target_num_layers=20))"

# No `from __future__ import annotations`: NeMo-Run's CLI parser reads prune's annotations.
"""

import dataclasses
import math
from pathlib import Path
from typing import Callable, Optional

import torch

from nemo_optim import checkpoint, runtime
from nemo_optim.data.corpus import DataConfig
from nemo_optim.data.packing import packed_sequences
from nemo_optim.errors import one_line_input_errors, refuse_existing_outputs
from nemo_optim.evaluation import evaluate_model
from nemo_optim.models.config import GPTModelConfig, build_gpt_model
from nemo_optim.models.forward import forward_logits
from nemo_optim.models.hf import export_hf
from nemo_optim.models.loader import load_model, load_tokenizer
from nemo_optim.prelaunch import LaunchTarget, check_data_source, readable_model_config
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
        from modelopt.torch.prune.plugins.mcore_minitron import drop_mcore_language_model_layers

        drop_mcore_language_model_layers(model, layers_to_drop=sorted(pruning_config.drop_layers))
    else:
        import modelopt.torch.prune as mtp
        from modelopt.torch.prune.plugins.mcore_minitron import get_mcore_minitron_config

        if forward_loop is None and not (scores_path and any(Path(scores_path).glob("rank*.pth"))):
            raise ValueError("Minitron pruning needs a forward_loop (or cached scores in scores_path).")
        if model_config.transformer_impl == "local":
            runtime.register_cpu_norms_for_pruning()
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
    static = build_gpt_model(config)
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

    if parallel_state.get_tensor_model_parallel_world_size() == 1 and parallel_state.get_pipeline_model_parallel_world_size() == 1:
        count = sum(p.numel() for p in static.parameters())
        if count != config.num_parameters():
            raise PruningResultError(f"pruned model has {count} parameters, its config implies {config.num_parameters()}.")
    return static


def check_arguments(*, nemo_checkpoint: str, pruning_config: PruningConfig, num_train_samples: int = 32,
                    data: Optional[DataConfig] = None, launch_target: Optional[LaunchTarget] = None, **_) -> None:
    """Pre-launch: the sample count, a calibration file, and the targets against the model's
    config when it can be read here without loading the model."""
    if num_train_samples < 1:
        raise PruningConfigError(f"num_train_samples={num_train_samples} must be at least 1.")
    check_data_source("data.source", data, launch_target)
    model_config = readable_model_config(nemo_checkpoint, launch_target)
    if model_config is not None:
        pruning_config.validate_against(model_config)


@one_line_input_errors
def prune(
    *,
    nemo_checkpoint: str,
    save_path: str,
    pruning_config: PruningConfig,
    devices: int = 1,
    num_nodes: int = 1,
    tp_size: int = 1,
    pp_size: int = 1,
    num_train_samples: int = 64,
    data: Optional[DataConfig] = None,
    tokenizer_path: Optional[str] = None,
    micro_batch_size: int = 4,
    scores_path: Optional[str] = None,
    hf_export_path: Optional[str] = None,
    overwrite: bool = False,
) -> Path:
    """Stage entry (NeMo 2's `llm.prune` arguments): prune `nemo_checkpoint` into `save_path`.

    Args:
        nemo_checkpoint: native checkpoint, HF directory, .gguf file or embedded model name.
        save_path: native checkpoint of the pruned model.
        pruning_config: targets (target_*) or drop_layers.
        devices / num_nodes: processes per node and nodes this job was launched with.
        tp_size / pp_size: parallelism for importance estimation.
        num_train_samples: calibration sequences for importance estimation.
        data: calibration text (default: the embedded corpus); its calibration split is used.
        scores_path: directory to cache importance scores in (ModelOpt writes rank<N>.pth per
            rank) and reuse them from: pruning the same model to other targets skips estimation.
            Keep the same TP/PP when reusing.
        hf_export_path: also export the pruned model to HF here.
    """
    data = data or DataConfig()
    refuse_existing_outputs([("save_path", save_path), ("hf_export_path", hf_export_path)], overwrite)
    if num_train_samples < 1:
        raise PruningConfigError(f"num_train_samples={num_train_samples} must be at least 1.")
    parallel = runtime.ParallelConfig(tensor_model_parallel_size=tp_size, pipeline_model_parallel_size=pp_size)
    with runtime.parallel_runtime(parallel):
        mismatch = runtime.launched_processes_message(devices, num_nodes)
        if mismatch:
            raise PruningConfigError(mismatch)
        loaded = load_model(nemo_checkpoint)
        pruning_config.validate_against(loaded.config)
        forward_loop = score_func = None
        if not pruning_config.drop_layers:
            tokenizer = load_tokenizer(tokenizer_path or loaded.hf_dir)
            # importance on the first num_train_samples; a target_params search scores its
            # candidates on the next ones (never on validation text)
            score_samples = max(num_train_samples // 4, 1) if pruning_config.target_params is not None else 0
            rows = packed_sequences(data, "calibration", tokenizer, num_train_samples + score_samples)
            batches = rows[:num_train_samples].split(micro_batch_size)
            score_batches = rows[num_train_samples:].split(micro_batch_size)

            def forward_loop(model):
                for batch in runtime.progress(batches, description="importance"):
                    forward_logits(model, batch)

            def score_func(model) -> float:
                return -evaluate_model(model, torch.cat(score_batches), micro_batch_size).loss

        model, config = prune_language_model(loaded.model, loaded.config, pruning_config, forward_loop, scores_path,
                                             score_func)
        runtime.print0(f"pruned {loaded.config.num_parameters() / 1e6:.1f} M -> {config.num_parameters() / 1e6:.1f} M "
                       f"parameters (layers {config.num_layers}, hidden {config.hidden_size}, ffn {config.ffn_hidden_size}, "
                       f"heads {config.num_attention_heads})")
        checkpoint.save_checkpoint(model, config, save_path, loaded.hf_dir, producer={
            "stage": "prune", "source": str(nemo_checkpoint), "pruning_config": dataclasses.asdict(pruning_config)})
        runtime.print0(f"pruned native checkpoint: {save_path}")
        if hf_export_path:
            export_hf(model, loaded.hf_dir, hf_export_path, dtype=config.torch_dtype)
            runtime.print0(f"HF export: {hf_export_path}")
    return Path(save_path)


prune.check_arguments = check_arguments
