"""Speculative-decoding recipes: `speculative_recipe` and named variants
(`nemo llm speculative --factory NAME`)."""

from typing import Optional

import nemo_run as run

from nemo_optim.data.corpus import DataConfig
from nemo_optim.models.hf import SMOLLM2
from nemo_optim.speculative.config import SpeculativeConfig
from nemo_optim.speculative.data import SelfDistillationConfig
from nemo_optim.speculative.measure import SpeculativeEvaluationConfig
from nemo_optim.stages.speculative import speculative
from nemo_optim_recipes.finetune import training_config


@run.cli.factory(target=speculative)
def speculative_recipe(
    model_path: str = SMOLLM2,
    algorithm: str = "eagle3",
    num_draft_tokens: int = 4,
    dir: Optional[str] = None,
    name: str = "eagle3",
    self_distillation_prompts: int = 0,
    num_nodes: int = 1,
    num_gpus_per_node: int = 1,
    max_steps: int = 100,
    global_batch_size: int = 8,
    micro_batch_size: int = 4,
    seq_length: int = 256,
    lr: float = 1e-3,
    min_lr: float = 1e-4,
    warmup_steps: int = 10,
) -> run.Partial[speculative]:
    """Draft heads (`algorithm`: eagle3, eagle1 or medusa) for the frozen `model_path`, trained
    on the embedded corpus (or on the model's own continuations of `self_distillation_prompts`
    prompts from it), measured on held-out prompts; the draft goes to `<dir>/<name>` and its
    serving export to `<dir>/<name>_export` (default outputs/smollm2_135m/eagle3). More than one
    process (GPUs x nodes) trains data parallel."""
    output = f"{dir or 'outputs/smollm2_135m'}/{name}"
    return run.Partial(
        speculative,
        model_path=model_path,
        output_path=output,
        export_path=f"{output}_export",
        speculative_config=run.Config(SpeculativeConfig, algorithm=algorithm, num_draft_tokens=num_draft_tokens),
        data=run.Config(DataConfig, source="embedded", seq_length=seq_length),
        self_distillation=run.Config(SelfDistillationConfig, num_prompts=self_distillation_prompts),
        training=training_config(max_steps, global_batch_size, micro_batch_size, lr, min_lr, warmup_steps),
        evaluation=run.Config(SpeculativeEvaluationConfig),
        devices=num_gpus_per_node,
        num_nodes=num_nodes,
    )


def _smollm2_cpu(recipe: run.Partial[speculative]) -> run.Partial[speculative]:
    """The SmolLM2 CPU drafts' data and measurement (benchmarks/results/speculative.md): the
    model's greedy continuations of 256 corpus prompts plus the corpus's own training text."""
    recipe.self_distillation.with_source_text = True
    recipe.evaluation.draft_lengths = [1, 2, 3, 4, 5]
    return recipe


@run.cli.factory(target=speculative)
def smollm2_135m_speculative_eagle3_cpu() -> run.Partial[speculative]:
    """EAGLE-3 for SmolLM2-135M-Instruct with a draft head over the 8192 most frequent tokens,
    300 steps: the speculative benchmark's best row (benchmarks/results/speculative.md)."""
    recipe = _smollm2_cpu(speculative_recipe(name="eagle3", self_distillation_prompts=256, max_steps=300, lr=2e-3,
                                             min_lr=2e-4, warmup_steps=15))
    recipe.speculative_config.draft_vocab_size = 8192
    return recipe


@run.cli.factory(target=speculative)
def smollm2_135m_speculative_medusa_cpu() -> run.Partial[speculative]:
    """Medusa heads (5, one residual block + a full-vocabulary LM head each) for SmolLM2-135M-Instruct,
    same data as the EAGLE-3 variant, 60 steps."""
    recipe = _smollm2_cpu(speculative_recipe(algorithm="medusa", name="medusa", self_distillation_prompts=256,
                                             max_steps=60, lr=2e-3, min_lr=2e-4, warmup_steps=3))
    recipe.speculative_config.num_medusa_heads = 5
    return recipe


@run.cli.factory(target=speculative)
def llama31_8b_speculative_eagle3_8gpu_h100_bf16() -> run.Partial[speculative]:
    """EAGLE-3 for Llama-3.1-8B-Instruct on 8 GPUs (data parallel, one model copy per GPU) in
    bf16: seq 2048, 20k prompts of self-distillation data, SDPA draft attention (cuDNN). Launch
    with 8 tasks per node (torchrun / Slurm); point `data.source` at your prompts."""
    recipe = speculative_recipe(model_path="/models/Llama-3.1-8B-Instruct", dir="/results", name="llama31_8b_eagle3",
                                self_distillation_prompts=20000, num_gpus_per_node=8, max_steps=20000,
                                global_batch_size=16, micro_batch_size=2, seq_length=2048, lr=1e-4, min_lr=1e-5,
                                warmup_steps=200)
    recipe.self_distillation.continuation_tokens = 1536
    recipe.self_distillation.batch_size = 64
    recipe.speculative_config.attention_impl = "sdpa"
    recipe.training.precision = "bf16"
    recipe.dtype = "bfloat16"
    recipe.evaluation.num_prompts = 64
    recipe.evaluation.max_new_tokens = 256
    recipe.evaluation.draft_lengths = [1, 2, 3, 4, 5, 6]
    return recipe

