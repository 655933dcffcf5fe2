"""The distillation config is ModelOpt's `DistillationConfig` (megatron plugin), read from YAML
or built in code; this module only checks it and reports mistakes in one line each.

YAML keys (all optional):

    logit_layers: [output_layer, output_layer]
    intermediate_layer_pairs:            # student layer, teacher layer[, cosine|mse]
      - [decoder.final_layernorm, decoder.final_layernorm]
    skip_lm_loss: true                   # false: LM loss + kd_loss_scale x KD loss
    kd_loss_scale: 1.0
    logit_kl_temperature: 1.0
    logit_kl_topk: null                  # an int: KL over the teacher's top-k tokens only
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

import torch

from modelopt.torch.distill.plugins.megatron import DistillationConfig

from nemo_optim import compat
from nemo_optim.errors import InputError

INTERMEDIATE_LOSSES = ("cosine", "mse")
_USER_FIELDS = ("intermediate_layer_pairs", "logit_layers", "skip_lm_loss", "kd_loss_scale",
                "logit_kl_temperature", "logit_kl_topk")


class DistillationConfigError(InputError):
    """A distillation config that cannot be used, with the field and what to do."""


def load_distillation_config(source: str | Path | DistillationConfig | dict | None) -> DistillationConfig:
    """A checked `DistillationConfig` from a YAML path, a dict, a config, or None (logits only)."""
    import yaml

    if source is None:
        return DistillationConfig()
    if isinstance(source, DistillationConfig):
        fields = {name: getattr(source, name) for name in _USER_FIELDS}
        where = "DistillationConfig"
    elif isinstance(source, dict):
        fields, where = dict(source), "distillation config"
    else:
        path = Path(source)
        if not path.is_file():
            raise DistillationConfigError(f"distillation_config_path={str(source)!r}: no such file.")
        try:
            fields = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark else ""
            raise DistillationConfigError(f"{path}: not valid YAML{at}: {getattr(error, 'problem', error)}.") from None
        if not isinstance(fields, dict):
            raise DistillationConfigError(f"{path}: expected a mapping of fields, got {type(fields).__name__}.")
        where = str(path)
    unknown = sorted(set(fields) - set(_USER_FIELDS))
    if unknown:
        raise DistillationConfigError(f"{where}: unknown field(s) {', '.join(unknown)}; "
                                      f"valid fields: {', '.join(_USER_FIELDS)}.")
    _check_values(fields, where)
    fields = {**fields}
    if "logit_layers" in fields:
        fields["logit_layers"] = tuple(fields["logit_layers"])
    if "intermediate_layer_pairs" in fields:
        fields["intermediate_layer_pairs"] = [tuple(pair) for pair in fields["intermediate_layer_pairs"] or []]
    return DistillationConfig(**fields)


def _check_values(fields: dict, where: str) -> None:
    def fail(message: str):
        raise DistillationConfigError(f"{where}: {message}.")

    logit_layers = fields.get("logit_layers", ("output_layer", "output_layer"))
    if not (isinstance(logit_layers, (list, tuple)) and len(logit_layers) == 2
            and all(isinstance(x, str) for x in logit_layers)):
        fail(f"logit_layers={logit_layers!r} must be two layer names [student, teacher]")
    for index, pair in enumerate(fields.get("intermediate_layer_pairs") or []):
        if not (isinstance(pair, (list, tuple)) and len(pair) in (2, 3) and all(isinstance(x, str) for x in pair)):
            fail(f"intermediate_layer_pairs[{index}]={pair!r} must be [student_layer, teacher_layer] or "
                 f"[student_layer, teacher_layer, {'|'.join(INTERMEDIATE_LOSSES)}]")
        if len(pair) == 3 and pair[2] not in INTERMEDIATE_LOSSES:
            fail(f"intermediate_layer_pairs[{index}] loss {pair[2]!r} is not one of {', '.join(INTERMEDIATE_LOSSES)}")
    for name in ("kd_loss_scale", "logit_kl_temperature"):
        value = fields.get(name, 1.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            fail(f"{name}={value!r} must be a positive number")
    topk = fields.get("logit_kl_topk")
    if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or topk < 1):
        fail(f"logit_kl_topk={topk!r} must be a positive integer or null")
    if not isinstance(fields.get("skip_lm_loss", True), bool):
        fail(f"skip_lm_loss={fields['skip_lm_loss']!r} must be true or false")


_LAYER_INDEX = re.compile(r"^decoder\.layers\.(\d+)\.(.*)$")


def _check_layer_name(name: str, role: str, model: torch.nn.Module, num_layers: int) -> None:
    """`name` as in the full (PP=1) model. Runs on the last pipeline stage, which holds the
    losses: `decoder.layers.N.<rest>` must be one of that stage's layers and <rest> must exist."""
    names = {n for n, _ in model.named_modules() if n}
    match = _LAYER_INDEX.match(name)
    if match:
        index, rest = int(match.group(1)), match.group(2)
        local = {n.split(".", 3)[3] for n in names if n.startswith("decoder.layers.") and n.count(".") >= 3}
        first = compat.first_layer_index(model.config)
        if index >= num_layers:
            raise DistillationConfigError(
                f"distillation config: {role} layer {name!r}: the {role} has {num_layers} layers "
                f"(0..{num_layers - 1}).")
        if index < first:
            raise DistillationConfigError(
                f"distillation config: {role} layer {name!r} is not on the last pipeline stage (layers "
                f"{first}..{num_layers - 1}), where the losses are computed; pick a later layer or lower PP.")
        if rest in local:
            return
        candidates = [f"decoder.layers.{index}.{r}" for r in sorted(local)]
    else:
        if name in names:
            return
        candidates = sorted({re.sub(r"^decoder\.layers\.\d+\.", "decoder.layers.0.", n) for n in names})
    close = difflib.get_close_matches(name, candidates, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"some valid names: {', '.join(candidates[:6])}"
    raise DistillationConfigError(f"distillation config: {role} layer {name!r} is not a module of the {role} model; "
                                  f"{hint}")


def validate_layer_names(config: DistillationConfig, student: torch.nn.Module, teacher: torch.nn.Module,
                         student_layers: int, teacher_layers: int) -> None:
    """Every layer the config names exists in the student / teacher (names of the full model).
    Checked on the last pipeline stage; the verdict is shared with the other stages."""
    from megatron.core import parallel_state

    from nemo_optim.models.forward import broadcast_from_last_stage

    error = None
    if parallel_state.is_pipeline_last_stage():
        try:
            _check_layer_name(config.logit_layers[0], "student", student, student_layers)
            _check_layer_name(config.logit_layers[1], "teacher", teacher, teacher_layers)
            for pair in config.intermediate_layer_pairs:
                _check_layer_name(pair[0], "student", student, student_layers)
                _check_layer_name(pair[1], "teacher", teacher, teacher_layers)
        except DistillationConfigError as found:
            error = str(found)
    error = broadcast_from_last_stage(error)
    if error:
        raise DistillationConfigError(error)


def describe(config: DistillationConfig) -> dict:
    """The user-facing fields (for manifests and logs)."""
    values = {name: getattr(config, name) for name in _USER_FIELDS}
    values["logit_layers"] = list(values["logit_layers"])
    values["intermediate_layer_pairs"] = [list(p) for p in values["intermediate_layer_pairs"]]
    return values


def replace(config: DistillationConfig, **changes) -> DistillationConfig:
    """A copy with `changes`, without the criterion/balancer a previous setup filled in."""
    return load_distillation_config({**describe(config), **changes})


__all__ = ["DistillationConfig", "DistillationConfigError", "load_distillation_config", "validate_layer_names",
           "describe", "replace", "chosen_distillation_config"]


def chosen_distillation_config(path: str | None, config: DistillationConfig | None) -> DistillationConfig:
    """The checked config from the YAML `path` or the code `config` (one of them, or neither
    for ModelOpt's defaults)."""
    if path and config is not None:
        raise DistillationConfigError("both distillation_config_path and distillation_config are set; keep one "
                                      "(on the CLI: distillation_config=None to use the YAML).")
    return load_distillation_config(path or config)
