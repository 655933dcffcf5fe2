"""Distillation recipes: `distillation_recipe` (NeMo 2's signature) and named variants
(`nemo llm distill --factory NAME`)."""

from typing import Optional

import nemo_run as run
from modelopt.torch.distill.plugins.megatron import DistillationConfig

from nemo_optim.data.corpus import DataConfig
from nemo_optim.stages.distill import distill
from nemo_optim.models.hf import SMOLLM2
from nemo_optim_recipes.finetune import training_config

# QAD of SmolLM2 INT4 on CPU (benchmarks/results/qad.md)
QAD_STEPS, QAD_LR = 60, 1e-3


@run.cli.factory(target=distill)
def distillation_recipe(
    model_path: str = "outputs/smollm2_135m/pruned_depth20",
    teacher_model_path: str = SMOLLM2,
    distillation_config_path: Optional[str] = None,
    dir: Optional[str] = None,
    name: str = "distilled",
    num_nodes: int = 1,
    num_gpus_per_node: int = 1,
    tp_size: int = 1,
    pp_size: int = 1,
    max_steps: int = 100,
    global_batch_size: int = 8,
    micro_batch_size: int = 2,
    seq_length: int = 256,
    lr: float = 1e-4,
    min_lr: float = 1e-5,
    warmup_steps: int = 10,
) -> run.Partial[distill]:
    """Logit KD from `teacher_model_path` into `model_path` on the embedded corpus;
    the distilled student goes to `<dir>/<name>` (default outputs/smollm2_135m/distilled)."""
    output = f"{dir or 'outputs/smollm2_135m'}/{name}"
    return run.Partial(
        distill,
        model_path=model_path,
        teacher_model_path=teacher_model_path,
        output_path=output,
        distillation_config_path=distillation_config_path,
        data=run.Config(DataConfig, source="embedded", seq_length=seq_length),
        training=training_config(max_steps, global_batch_size, micro_batch_size, lr, min_lr, warmup_steps),
        devices=num_gpus_per_node,
        num_nodes=num_nodes,
        tp_size=tp_size,
        pp_size=pp_size,
    )


@run.cli.factory(target=distill)
def smollm2_135m_distill_depth20_cpu() -> run.Partial[distill]:
    """SmolLM2-135M teacher -> its 20-layer Minitron-pruned student (run
    smollm2_135m_prune_depth20_cpu first): logit KD at temperature 2 + LM loss on the embedded
    corpus, CPU scale, the settings of the best row in benchmarks/results/distill.md. Set
    teacher_model_path=outputs/smollm2_135m/teacher_corrected after smollm2_135m_finetune_teacher_cpu."""
    recipe = distillation_recipe(name="distilled_depth20", max_steps=60, global_batch_size=4, lr=1e-3, min_lr=1e-4,
                                 warmup_steps=6)
    recipe.distillation_config = run.Config(DistillationConfig, skip_lm_loss=False, logit_kl_temperature=2.0)
    return recipe


@run.cli.factory(target=distill)
def smollm2_135m_distill_qad_int4_cpu() -> run.Partial[distill]:
    """Quantization-aware distillation: the INT4 PTQ checkpoint of smollm2_135m_ptq_int4_cpu
    (run it first) learns from the unquantized SmolLM2-135M through its fake quantizers (logit KD,
    calibrated scales kept). Export the result with `nemo llm ptq --factory smollm2_135m_ptq_int4_cpu
    model_path=outputs/smollm2_135m/qad_int4 export_path=...`: a quantized checkpoint is
    exported in its own format, without recalibration. Settings: benchmarks/results/qad.md."""
    recipe = distillation_recipe(model_path="outputs/smollm2_135m/ptq_int4_native", name="qad_int4",
                                 max_steps=QAD_STEPS, global_batch_size=4, lr=QAD_LR, min_lr=QAD_LR / 10,
                                 warmup_steps=QAD_STEPS // 10)
    recipe.data.source = "embedded:pydoc"  # the calibration text
    return recipe


@run.cli.factory(target=distill)
def llama31_8b_distill_4b_8gpu_h100_bf16() -> run.Partial[distill]:
    """Minitron Llama-3.1-8B -> 4B (width-pruned) distillation at TP=8, bf16 autocast,
    seq 4096. Launch with 8 GPUs; point `data.source` at your corpus."""
    recipe = distillation_recipe(model_path="/results/llama31_4b_width",
                                 teacher_model_path="/models/Llama-3.1-8B-Instruct",
                                 dir="/results", name="llama31_4b_distilled", num_gpus_per_node=8, tp_size=8,
                                 max_steps=30000, global_batch_size=768, micro_batch_size=4, seq_length=4096,
                                 lr=1e-4, min_lr=1e-5, warmup_steps=100)
    recipe.training.precision = "bf16"
    return recipe

