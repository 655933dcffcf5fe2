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
    python -c "from nemo_optim.stages.prune import prune; from nemo_optim.pruning.config import PruningConfig; \
prune(model_path='smollm2-135m-instruct', output_path='/tmp/pruned', \
pruning_config=PruningConfig(target_num_layers=20))"

# No `from __future__ import annotations`: NeMo-Run's CLI parser reads prune's annotations.
"""

import dataclasses
from pathlib import Path
from typing import Optional

import torch

from nemo_optim import runtime
from nemo_optim.progress import progress
from nemo_optim.data.corpus import DataConfig
from nemo_optim.data.packing import packed_sequences
from nemo_optim.evaluation import evaluate_model
from nemo_optim.models.forward import forward_logits
from nemo_optim.models.loader import load_model, load_tokenizer
from nemo_optim.prelaunch import LaunchTarget, check_data_source, readable_model_config
from nemo_optim.pruning.config import PruningConfig, PruningConfigError
from nemo_optim.pruning.pruner import check_minitron_available, prune_language_model
from nemo_optim.stage import refuse_existing_outputs, save_stage_model, stage_entry, stage_runtime


def check_arguments(*, model_path: str, pruning_config: PruningConfig, num_train_samples: int = 64,
                    data: Optional[DataConfig] = None, launch_target: Optional[LaunchTarget] = None, **_) -> None:
    """Pre-launch (and at the start): the sample count, a calibration file, and the targets
    against the model's config when it can be read here without loading the model."""
    if num_train_samples < 1:
        raise PruningConfigError(f"num_train_samples={num_train_samples} must be at least 1.")
    check_data_source("data.source", data, launch_target)
    model_config = readable_model_config(model_path, launch_target)
    if model_config is not None:
        pruning_config.validate_against(model_config)
    if not pruning_config.drop_layers and (launch_target is None or launch_target.local):
        check_minitron_available()  # (a remote job checks with its own ModelOpt when it starts)


@stage_entry(check_arguments)
def prune(
    *,
    model_path: str,
    output_path: str,
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
    nemo_checkpoint: Optional[str] = None,
    save_path: Optional[str] = None,
) -> Path:
    """Stage entry (NeMo 2's `llm.prune`; its `nemo_checkpoint` and `save_path` are accepted for
    `model_path` and `output_path`): prune `model_path` into `output_path`.

    Args:
        model_path: native checkpoint, HF directory, .gguf file or embedded model name.
        output_path: native checkpoint of the pruned model.
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
    check_arguments(model_path=model_path, pruning_config=pruning_config, num_train_samples=num_train_samples)
    refuse_existing_outputs([("output_path", output_path), ("hf_export_path", hf_export_path)], overwrite)
    with stage_runtime(tp_size, pp_size, devices, num_nodes):
        loaded = load_model(model_path)
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
                for batch in progress(batches, description="importance"):
                    forward_logits(model, batch)

            def score_func(model) -> float:
                return -evaluate_model(model, torch.cat(score_batches), micro_batch_size).loss

        model, config = prune_language_model(loaded.model, loaded.config, pruning_config, forward_loop, scores_path,
                                             score_func)
        runtime.print0(f"pruned {loaded.config.num_parameters() / 1e6:.1f} M -> {config.num_parameters() / 1e6:.1f} M "
                       f"parameters (layers {config.num_layers}, hidden {config.hidden_size}, "
                       f"ffn {config.ffn_hidden_size}, "
                       f"heads {config.num_attention_heads})")
        save_stage_model(model, config, output_path, loaded.hf_dir, hf_export_path, producer={
            "stage": "prune", "source": str(model_path), "pruning_config": dataclasses.asdict(pruning_config)})
    return Path(output_path)
