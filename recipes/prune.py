"""Pruning recipes: `prune_recipe` and named variants (`nemo llm prune --factory NAME`)."""

from typing import Optional

import nemo_run as run

from nemo_optim.data.corpus import DataConfig
from nemo_optim.models.hf import SMOLLM2
from nemo_optim.pruning.config import PruningConfig
from nemo_optim.stages.prune import prune


@run.cli.factory(target=prune)
def prune_recipe(
    model_path: str = SMOLLM2,
    output_path: str = "outputs/smollm2_135m/pruned",
    target_num_layers: Optional[int] = 20,
    target_hidden_size: Optional[int] = None,
    target_ffn_hidden_size: Optional[int] = None,
    target_num_attention_heads: Optional[int] = None,
    target_params: Optional[float] = None,
    num_train_samples: int = 64,
    seq_length: int = 256,
    devices: int = 1,
    tp_size: int = 1,
    pp_size: int = 1,
    hf_export_path: Optional[str] = None,
) -> run.Partial[prune]:
    """Minitron pruning (importance on the embedded corpus) to the given targets, or to the
    best architecture under `target_params` (set the target_* to None); by default SmolLM2's
    30 layers to 20."""
    return run.Partial(
        prune,
        model_path=model_path,
        output_path=output_path,
        pruning_config=run.Config(
            PruningConfig,
            target_num_layers=target_num_layers,
            target_hidden_size=target_hidden_size,
            target_ffn_hidden_size=target_ffn_hidden_size,
            target_num_attention_heads=target_num_attention_heads,
            target_params=target_params,
        ),
        devices=devices,
        tp_size=tp_size,
        pp_size=pp_size,
        num_train_samples=num_train_samples,
        data=run.Config(DataConfig, source="embedded", seq_length=seq_length),
        hf_export_path=hf_export_path,
    )


@run.cli.factory(target=prune)
def smollm2_135m_prune_depth20_cpu() -> run.Partial[prune]:
    """SmolLM2-135M, 30 -> 20 layers by Minitron importance (135 M -> 99 M parameters)."""
    return prune_recipe(output_path="outputs/smollm2_135m/pruned_depth20", target_num_layers=20,
                        hf_export_path="outputs/smollm2_135m/pruned_depth20_hf")


@run.cli.factory(target=prune)
def smollm2_135m_prune_width_cpu() -> run.Partial[prune]:
    """SmolLM2-135M width pruning to ~62% of the parameters: hidden 576 -> 448,
    ffn 1536 -> 1024, heads kept (134.5 M -> 83.9 M)."""
    return prune_recipe(output_path="outputs/smollm2_135m/pruned_width", target_num_layers=None, target_hidden_size=448,
                        target_ffn_hidden_size=1024,
                        hf_export_path="outputs/smollm2_135m/pruned_width_hf")


@run.cli.factory(target=prune)
def llama31_8b_prune_width4b_8gpu_h100_bf16() -> run.Partial[prune]:
    """Minitron Llama-3.1-8B -> 4B width pruning (hidden 4096 -> 3072, ffn 14336 -> 9216),
    importance at TP=8 on 1024 sequences. Launch with 8 GPUs."""
    recipe = prune_recipe(model_path="/models/Llama-3.1-8B-Instruct", output_path="/results/llama31_4b_width",
                          target_num_layers=None, target_hidden_size=3072, target_ffn_hidden_size=9216,
                          num_train_samples=1024, seq_length=4096, devices=8, tp_size=8)
    return recipe

