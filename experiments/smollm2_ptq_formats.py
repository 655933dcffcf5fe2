"""Experiment: SmolLM2-135M quantized to three formats, one NeMo-Run task each.

    .venv/bin/python -m experiments.smollm2_ptq_formats            # runs locally, sequentially
    .venv/bin/python -m experiments.smollm2_ptq_formats --dryrun

Each task is a recipe with a small edit (fewer calibration sequences for a quick CPU run).
"""

import argparse
import sys

import nemo_run as run

from nemo_optim_recipes.executors import local
from nemo_optim_recipes.launching import use_this_python, wait_for_terminal_states
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
    import fiddle as fdl

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dryrun", action="store_true")
    parser.add_argument("--overwrite", action="store_true", help="replace the exports of an earlier run")
    args = parser.parse_args(argv)
    use_this_python()
    with run.Experiment("smollm2_ptq_formats", log_level="WARN") as exp:
        for name, task in tasks(args.overwrite).items():
            exp.add(task, executor=fdl.build(local()), name=name)
        if args.dryrun:
            exp.dryrun()
            return 0
        exp.run(sequential=True, detach=False)
        states = wait_for_terminal_states(exp)
    failed = {k: v for k, v in states.items() if v != "SUCCEEDED"}
    print(states)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
