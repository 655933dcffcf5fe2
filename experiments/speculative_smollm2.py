"""Experiment: draft heads for SmolLM2-135M, one NeMo-Run experiment.

    EAGLE-3 (the `speculative` stage: self-distillation data, train, measure, export) ->
    Medusa (same data, cached) -> report (acceptance length and speed-up per draft length)

    .venv/bin/python -m experiments.speculative_smollm2 --yes        # run times: benchmarks/results/README.md
    .venv/bin/python -m experiments.speculative_smollm2 eagle3_steps=20 medusa_steps=5 --dryrun --yes

Every task is a recipe with small edits; finished stages are skipped on a re-run (`run_stage`).
"""

from pathlib import Path

import nemo_run as run

from experiments.compress_smollm2 import stage_task
from experiments.entrypoint import run_tasks
from nemo_optim.models.hf import SMOLLM2
from nemo_optim.report import report
from nemo_optim_recipes.speculative import smollm2_135m_speculative_eagle3_cpu, smollm2_135m_speculative_medusa_cpu


def speculative_tasks(
    model: str = SMOLLM2,
    work_dir: str = "outputs/speculative_smollm2",
    eagle3_steps: int = 0,
    medusa_steps: int = 0,
    self_distillation_prompts: int = 0,
    seq_length: int = 0,
    draft_vocab_size: int = 0,
    eval_prompts: int = 8,
    max_new_tokens: int = 0,
) -> dict[str, run.Partial]:
    """Task name -> task, in dependency order. A value of 0 keeps the recipe's."""
    tasks, drafts = {}, {}
    for name, recipe, steps in (("eagle3", smollm2_135m_speculative_eagle3_cpu(), eagle3_steps),
                                ("medusa", smollm2_135m_speculative_medusa_cpu(), medusa_steps)):
        recipe.model_path = model
        recipe.output_path, recipe.export_path = f"{work_dir}/{name}", f"{work_dir}/{name}_export"
        if steps:
            recipe.training.max_steps = steps
            recipe.training.val_check_interval = max(steps // 4, 1)
            recipe.training.checkpoint_interval = max(steps // 4, 1)
        recipe.self_distillation.num_prompts = self_distillation_prompts or recipe.self_distillation.num_prompts
        recipe.data.seq_length = seq_length or recipe.data.seq_length
        if recipe.speculative_config.draft_vocab_size and draft_vocab_size:  # EAGLE's reduced draft head
            recipe.speculative_config.draft_vocab_size = draft_vocab_size
        recipe.evaluation.num_prompts = eval_prompts
        recipe.evaluation.max_new_tokens = max_new_tokens or recipe.evaluation.max_new_tokens
        tasks[name] = stage_task(recipe, name, recipe.output_path, work_dir, [model])
        drafts[name] = recipe.output_path
    tasks["report"] = run.Partial(report, output_dir=f"{work_dir}/report", models={}, evaluations={},
                                  speculative=drafts, title=f"Speculative decoding of {Path(model).name}")
    return tasks


@run.cli.entrypoint(type="experiment", namespace="experiments")
def speculative_smollm2(
    ctx: run.cli.RunContext,
    model: str = SMOLLM2,
    work_dir: str = "outputs/speculative_smollm2",
    eagle3_steps: int = 0,
    medusa_steps: int = 0,
    self_distillation_prompts: int = 0,
    seq_length: int = 0,
    draft_vocab_size: int = 0,
    eval_prompts: int = 8,
    max_new_tokens: int = 0,
) -> None:
    """EAGLE-3 and Medusa drafts -> report (speculative_tasks; a value of 0 keeps the recipe's)."""
    settings = {key: value for key, value in locals().items() if key != "ctx"}  # speculative_tasks' arguments
    run_tasks(ctx, "speculative_smollm2", speculative_tasks(**settings), report=f"{work_dir}/report/report.md")


if __name__ == "__main__":
    run.cli.main(speculative_smollm2)
