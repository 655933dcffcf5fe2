"""Fine-tuning recipes: `finetune_recipe` and named variants (`nemo llm finetune --factory NAME`).

The named variant is Minitron's teacher correction: fine-tune the teacher on the distillation
data, then distill from the corrected teacher (`teacher_model_path=<its output>`)."""

from typing import Optional

import nemo_run as run

from nemo_optim.data.corpus import DataConfig
from nemo_optim.stages.finetune import finetune
from nemo_optim.models.hf import SMOLLM2
from nemo_optim.training import TrainingConfig


def training_config(max_steps: int, global_batch_size: int, micro_batch_size: int, lr: float, min_lr: float,
                    warmup_steps: int) -> run.Config[TrainingConfig]:
    """The training loop's settings shared by the finetune and distill recipes: validation and a
    checkpoint four times per run."""
    return run.Config(TrainingConfig, max_steps=max_steps, global_batch_size=global_batch_size,
                      micro_batch_size=micro_batch_size, lr=lr, min_lr=min_lr, warmup_steps=warmup_steps,
                      val_check_interval=max(max_steps // 4, 1), checkpoint_interval=max(max_steps // 4, 1))


@run.cli.factory(target=finetune)
def finetune_recipe(
    model_path: str = SMOLLM2,
    dir: Optional[str] = None,
    name: str = "finetuned",
    num_nodes: int = 1,
    num_gpus_per_node: int = 1,
    tp_size: int = 1,
    pp_size: int = 1,
    max_steps: int = 60,
    global_batch_size: int = 4,
    micro_batch_size: int = 2,
    seq_length: int = 256,
    lr: float = 1e-4,
    min_lr: float = 1e-5,
    warmup_steps: int = 6,
) -> run.Partial[finetune]:
    """LM-loss fine-tuning of `model_path` on the embedded corpus; the result goes to
    `<dir>/<name>` (default outputs/smollm2_135m/finetuned)."""
    return run.Partial(
        finetune,
        model_path=model_path,
        output_path=f"{dir or 'outputs/smollm2_135m'}/{name}",
        data=run.Config(DataConfig, source="embedded", seq_length=seq_length),
        training=training_config(max_steps, global_batch_size, micro_batch_size, lr, min_lr, warmup_steps),
        devices=num_gpus_per_node,
        num_nodes=num_nodes,
        tp_size=tp_size,
        pp_size=pp_size,
    )


@run.cli.factory(target=finetune)
def smollm2_135m_finetune_teacher_cpu() -> run.Partial[finetune]:
    """Teacher correction for SmolLM2-135M on the embedded corpus (60 steps x 4 x 256 tokens,
    lr 1e-4): held-out perplexity 20.4 -> 12.8. Distill from outputs/smollm2_135m/teacher_corrected."""
    return finetune_recipe(name="teacher_corrected")


@run.cli.factory(target=finetune)
def llama31_8b_finetune_teacher_8gpu_h100_bf16() -> run.Partial[finetune]:
    """Teacher correction of Llama-3.1-8B-Instruct at TP=8, bf16 autocast, seq 4096, before the
    8B -> 4B distillation. Point `data.source` at the distillation corpus."""
    recipe = finetune_recipe(model_path="/models/Llama-3.1-8B-Instruct", dir="/results", name="llama31_8b_corrected",
                             num_gpus_per_node=8, tp_size=8, max_steps=1000, global_batch_size=128, micro_batch_size=4,
                             seq_length=4096, lr=1e-5, min_lr=1e-6, warmup_steps=50)
    recipe.training.precision = "bf16"
    return recipe

