"""ModelOpt quantization configs in both of ModelOpt's shapes.

ModelOpt <= 0.43 takes `quant_cfg` as a dict {pattern: attributes}; ModelOpt >= 0.44 takes an
ordered list of entries {"quantizer_name", "parent_class", "cfg", "enable"}. We keep configs as
that list (the newer, explicit form) and convert for the installed ModelOpt, so one recipe works
with either (NeMo 2.7's Quantizer broke on every preset when the form changed).
"""

from __future__ import annotations

import copy
from typing import Any

from nemo_optim import compat

Entry = dict[str, Any]


def entries_from_modelopt(quant_cfg: dict | list) -> list[Entry]:
    """Any ModelOpt `quant_cfg` (dict or list form) -> our ordered list of entries."""
    if isinstance(quant_cfg, list):
        return [dict(entry) for entry in copy.deepcopy(quant_cfg)]
    entries: list[Entry] = []
    for pattern, value in copy.deepcopy(quant_cfg).items():
        if pattern.startswith("nn.") and isinstance(value, dict):
            # class-scoped: {"nn.BatchNorm1d": {"*": {...}}}
            for inner_pattern, inner in value.items():
                entries.append(_entry(inner_pattern, inner, parent_class=pattern))
        else:
            entries.append(_entry(pattern, value))
    return entries


def _entry(pattern: str, value: dict | list, parent_class: str | None = None) -> Entry:
    entry: Entry = {"quantizer_name": pattern}
    if parent_class:
        entry["parent_class"] = parent_class
    if isinstance(value, list):
        entry["cfg"] = value
        return entry
    value = dict(value)
    if "enable" in value:
        entry["enable"] = value.pop("enable")
    if value:
        entry["cfg"] = value
    return entry


def entries_to_modelopt(entries: list[Entry], form: str = "auto") -> dict | list:
    """Our entries -> `quant_cfg` in `form`: "list", "dict", or "auto" (what the installed
    ModelOpt expects)."""
    if form == "list" or (form == "auto" and compat.quant_cfg_uses_list_form()):
        return copy.deepcopy(entries)
    quant_cfg: dict[str, Any] = {}
    for entry in entries:
        cfg = copy.deepcopy(entry.get("cfg", {}))
        if isinstance(cfg, list):
            value: Any = cfg
        else:
            value = dict(cfg)
            if "enable" in entry:
                value["enable"] = entry["enable"]
        if entry.get("parent_class"):
            quant_cfg.setdefault(entry["parent_class"], {})[entry["quantizer_name"]] = value
        else:
            quant_cfg.pop(entry["quantizer_name"], None)  # re-insert: later entries win
            quant_cfg[entry["quantizer_name"]] = value
    return quant_cfg


def preset_entries(preset_name: str) -> tuple[list[Entry], Any]:
    """(entries, algorithm) of a ModelOpt preset such as "FP8_DEFAULT_CFG"."""
    import modelopt.torch.quantization as mtq

    preset = getattr(mtq, preset_name)
    return entries_from_modelopt(preset["quant_cfg"]), copy.deepcopy(preset.get("algorithm", "max"))


def preset_quantizer(preset_name: str, quantizer_name: str = "*input_quantizer"):
    """A standalone ModelOpt `TensorQuantizer` with the attributes `preset_name` gives
    `quantizer_name` (the last matching entry wins, as in ModelOpt)."""
    from modelopt.torch.quantization.config import QuantizerAttributeConfig
    from modelopt.torch.quantization.nn import TensorQuantizer

    entries, _ = preset_entries(preset_name)
    matching = [entry for entry in entries if entry["quantizer_name"] == quantizer_name and "cfg" in entry]
    if not matching or not isinstance(matching[-1]["cfg"], dict):
        raise ValueError(f"{preset_name} has no single-format entry for {quantizer_name!r}")
    return TensorQuantizer(QuantizerAttributeConfig(**matching[-1]["cfg"]))


def set_block_size(entries: list[Entry], block_size: int) -> None:
    """Sets the last-axis block size of every weight quantizer that is blocked."""
    for entry in entries:
        if "weight_quantizer" not in entry["quantizer_name"]:
            continue
        cfgs = entry.get("cfg")
        for cfg in cfgs if isinstance(cfgs, list) else [cfgs] if cfgs else []:
            if isinstance(cfg.get("block_sizes"), dict) and -1 in cfg["block_sizes"]:
                cfg["block_sizes"][-1] = block_size


def from_json(value: Any) -> Any:
    """Undoes what JSON does to a ModelOpt config: `num_bits` [4, 3] back to a tuple and
    block_sizes keys "-1" back to ints."""
    if isinstance(value, list):
        return [from_json(v) for v in value]
    if not isinstance(value, dict):
        return value
    result = {}
    for key, item in value.items():
        if key == "num_bits" and isinstance(item, list):
            item = tuple(item)
        elif key == "block_sizes" and isinstance(item, dict):
            item = {int(k) if isinstance(k, str) and k.lstrip("-").isdigit() else k: v for k, v in item.items()}
        else:
            item = from_json(item)
        result[key] = item
    return result
