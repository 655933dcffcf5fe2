"""NeMo-Run recipes for nemo-optim: factories that return `run.Partial` of a stage entry
function, executor factories, and the `nemo llm` CLI namespace (`recipes.llm`).

Recipe names follow `naming.recipe_name`: <model>_<stage>[_<variant>]_<hardware>.
"""
