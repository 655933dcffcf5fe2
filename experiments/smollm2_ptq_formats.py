"""Experiment: SmolLM2-135M quantized to three formats, one NeMo-Run task each.

    .venv/bin/python -m experiments.smollm2_ptq_formats --yes           # runs locally, sequentially
    .venv/bin/python -m experiments.smollm2_ptq_formats overwrite=True run.executor=torchrun --yes

Each task is a recipe with a small edit (fewer calibration sequences for a quick CPU run).
"""

import nemo_run as run

from experiments.entrypoint import run_tasks
from nemo_optim_recipes.ptq import smollm2_135m_ptq_fp8_cpu, smollm2_135m_ptq_int4_awq_cpu, smollm2_135m_ptq_int8_sq_cpu


def quick(recipe: run.Partial) -> run.Partial:
    """Hypothesis: 16 calibration sequences are enough to compare formats on CPU."""
    recipe.quantization_config.calibration_dataset_size = 16
    return recipe


def tasks(overwrite: bool = False) -> dict[str, run.Partial]:
    recipes = {
        "fp8": quick(smollm2_135m_ptq_fp8_cpu()),
        "int8_sq": quick(smollm2_135m_ptq_int8_sq_cpu()),
        "int4_awq": quick(smollm2_135m_ptq_int4_awq_cpu()),
    }
    for recipe in recipes.values():
        recipe.overwrite = overwrite  # a second run replaces the first one's exports only when asked
    return recipes


@run.cli.entrypoint(type="experiment", namespace="experiments")
def smollm2_ptq_formats(ctx: run.cli.RunContext, overwrite: bool = False) -> None:
    """FP8, INT8-SmoothQuant and INT4-AWQ exports of SmolLM2 (tasks)."""
    run_tasks(ctx, "smollm2_ptq_formats", tasks(overwrite))


if __name__ == "__main__":
    run.cli.main(smollm2_ptq_formats)
