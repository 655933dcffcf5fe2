"""Typed pruning targets (NeMo 2's `PruningConfig` names), checked against the model before any work.

# No `from __future__ import annotations`: NeMo-Run's CLI parser reads these annotations.
"""

import dataclasses
from typing import Optional

from nemo_optim.errors import InputError
from nemo_optim.models.config import GPTModelConfig

TARGET_FIELDS = ("target_ffn_hidden_size", "target_hidden_size", "target_num_attention_heads",
                 "target_num_query_groups", "target_num_layers")


class PruningConfigError(InputError):
    """A pruning target that cannot be honoured, with the fix."""


@dataclasses.dataclass
class PruningConfig:
    """Pruning targets: Minitron importance-based width/depth targets, or layers to drop."""

    target_ffn_hidden_size: Optional[int] = None
    target_hidden_size: Optional[int] = None
    target_num_attention_heads: Optional[int] = None
    target_num_query_groups: Optional[int] = None
    """Accepted for NeMo 2 compatibility; ModelOpt >= 0.41 cannot prune query groups, so it must
    equal the model's value."""
    target_num_layers: Optional[int] = None
    """Depth pruning by importance (Minitron): the least important layers are removed."""
    drop_layers: list[int] = dataclasses.field(default_factory=list)
    """1-based layer numbers to remove directly (no importance estimation)."""
    target_params: Optional[float] = None
    """A parameter budget instead of explicit targets: ModelOpt's Minitron search tries the
    width/depth grid (within max_width_pruning / max_depth_pruning) for architectures under it
    and keeps the one that scores best (lowest loss) on held-out calibration text."""
    max_width_pruning: float = 0.4
    max_depth_pruning: float = 0.2
    top_k: int = 5
    """Candidates (the largest under the budget) scored in the target_params search."""

    def __post_init__(self) -> None:
        errors = [f"{name}={getattr(self, name)} must be a positive integer"
                  for name in TARGET_FIELDS if getattr(self, name) is not None and getattr(self, name) < 1]
        explicit = [name for name in TARGET_FIELDS if getattr(self, name) is not None]
        if self.drop_layers and explicit:
            errors.append("drop_layers cannot be combined with target_* fields; use one or the other")
        if self.target_params is not None:
            if self.target_params <= 0:
                errors.append(f"target_params={self.target_params} must be positive")
            if explicit or self.drop_layers:
                errors.append(f"target_params cannot be combined with {', '.join(explicit) or 'drop_layers'}; "
                              f"give a parameter budget or explicit targets")
        for name in ("max_width_pruning", "max_depth_pruning"):
            if not 0 <= getattr(self, name) < 1:
                errors.append(f"{name}={getattr(self, name)} must be in [0, 1)")
        if self.top_k < 1:
            errors.append(f"top_k={self.top_k} must be at least 1")
        if len(set(self.drop_layers)) != len(self.drop_layers):
            errors.append(f"drop_layers={self.drop_layers} lists a layer twice")
        if not self.drop_layers and not explicit and self.target_params is None:
            errors.append("set at least one target_* field, target_params or drop_layers")
        if errors:
            raise PruningConfigError("pruning_config: " + "; ".join(errors) + ".")

    def export_config(self, model: GPTModelConfig) -> dict[str, int]:
        """ModelOpt's `export_config` constraint: only the sizes that change."""
        pairs = {"ffn_hidden_size": self.target_ffn_hidden_size, "hidden_size": self.target_hidden_size,
                 "num_attention_heads": self.target_num_attention_heads, "num_layers": self.target_num_layers}
        return {k: v for k, v in pairs.items() if v is not None and v != getattr(model, k)}

    def validate_against(self, model: GPTModelConfig) -> None:
        """Every target the model and ModelOpt can honour; all problems in one error."""
        errors = []
        for name in TARGET_FIELDS:
            target, current = getattr(self, name), getattr(model, name.removeprefix("target_"))
            if target is not None and target > current:
                errors.append(f"{name}={target} is larger than the model's {current}")
        heads = self.target_num_attention_heads or model.num_attention_heads
        if self.target_num_query_groups is not None and self.target_num_query_groups != model.num_query_groups:
            errors.append(f"target_num_query_groups={self.target_num_query_groups}: this ModelOpt cannot prune query "
                          f"groups; leave it unset or set it to {model.num_query_groups}")
        if heads % model.num_query_groups:
            errors.append(f"target_num_attention_heads={heads} must be a multiple of "
                          f"num_query_groups={model.num_query_groups}")
        bad = [n for n in self.drop_layers if not 1 <= n <= model.num_layers]
        if bad:
            errors.append(f"drop_layers {bad} out of range: layers are numbered 1..{model.num_layers}")
        if self.drop_layers and len(set(self.drop_layers)) >= model.num_layers:
            errors.append("drop_layers would remove every layer")
        if self.target_params is not None and self.target_params >= model.num_parameters():
            errors.append(f"target_params={self.target_params:.4g} is not below the model's "
                          f"{model.num_parameters()} parameters")
        if errors:
            raise PruningConfigError("pruning_config: " + "; ".join(errors) + ".")

    def pruned_model_config(self, model: GPTModelConfig) -> GPTModelConfig:
        """The config the pruned model must have (used to check the result)."""
        changes = self.export_config(model)
        if self.drop_layers:
            changes["num_layers"] = model.num_layers - len(self.drop_layers)
        return dataclasses.replace(model, **changes)
