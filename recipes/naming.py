"""The rule recipe names follow, written once: <model>_<stage>[_<variant>]_<hardware>.

hardware is `cpu` or `<N>gpu[_<gpu>][_<dtype>]`, e.g. `8gpu_h100_bf16`.
"""

from __future__ import annotations

import re

STAGES = ("import", "export", "evaluate", "ptq", "prune", "finetune", "distill", "speculative", "compress")
_PART = re.compile(r"^[a-z0-9]+(?:[a-z0-9.]*[a-z0-9])?$")
_NAME = re.compile(
    r"^(?P<model>[a-z0-9_.]+?)_(?P<stage>" + "|".join(STAGES) + r")(?:_(?P<variant>[a-z0-9_.]+?))?"
    r"_(?P<hardware>cpu|\d+gpu(?:_[a-z0-9]+)*)$"
)


def recipe_name(model: str, stage: str, hardware: str, variant: str | None = None) -> str:
    """e.g. recipe_name("smollm2_135m", "ptq", "cpu", "fp8") -> "smollm2_135m_ptq_fp8_cpu"."""
    if stage not in STAGES:
        raise ValueError(f"stage={stage!r}: choose one of {', '.join(STAGES)}.")
    parts = [model, stage] + ([variant] if variant else []) + [hardware]
    for part in parts:
        if not all(_PART.match(piece) for piece in part.split("_")):
            raise ValueError(f"recipe name part {part!r}: use lower-case letters, digits and '_'.")
    return "_".join(parts)


def parse_recipe_name(name: str) -> dict[str, str | None]:
    """Inverse of `recipe_name`; raises ValueError for a name that breaks the rule."""
    match = _NAME.match(name)
    if not match:
        raise ValueError(f"recipe name {name!r} does not follow <model>_<stage>[_<variant>]_<hardware>.")
    return match.groupdict()
