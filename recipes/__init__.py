"""NeMo-Run recipes for nemo-optim: factories that return `run.Partial` of a stage entry
function, executor factories, and the `nemo llm` CLI namespace (`nemo_optim_recipes.llm`).

This directory installs as the package `nemo_optim_recipes` (pyproject.toml's package-dir):
import it under that name, e.g. `from nemo_optim_recipes.ptq import ptq_recipe`.

Recipe names follow `naming.recipe_name`: <model>_<stage>[_<variant>]_<hardware>.
"""
