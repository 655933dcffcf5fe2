"""Experiment: SmolLM2-135M quantized to three formats, one NeMo-Run task each.

    .venv/bin/python -m experiments.smollm2_ptq_formats            # runs locally, sequentially
    .venv/bin/python -m experiments.smollm2_ptq_formats --dryrun

Each task is a recipe with a small edit (fewer calibration sequences for a quick CPU run).
"""

import argparse
import sys

import nemo_run as run

from nemo_optim_recipes.executors import local
from nemo_optim_recipes.launching import run_experiment
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dryrun", action="store_true")
    parser.add_argument("--overwrite", action="store_true", help="replace the exports of an earlier run")
    args = parser.parse_args(argv)
    return run_experiment("smollm2_ptq_formats", tasks(args.overwrite), local(), dryrun=args.dryrun)


if __name__ == "__main__":
    sys.exit(main())
