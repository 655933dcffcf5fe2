"""Typed settings of the speculative-decoding stage and the ModelOpt config they become.

# No `from __future__ import annotations`: NeMo-Run's CLI parser reads these annotations.
"""

import copy
import dataclasses
from typing import Any, Literal, Optional

from nemo_optim import compat
from nemo_optim.errors import InputError
from nemo_optim.models.hf import rope_parameters

Algorithm = Literal["eagle3", "eagle1", "medusa"]
ALGORITHMS = ("eagle3", "eagle1", "medusa")
AttentionImpl = Literal["eager", "sdpa", "flex_attention"]


class SpeculativeConfigError(InputError):
    """A speculative-decoding setting that cannot work, with the fix."""


@dataclasses.dataclass
class SpeculativeConfig:
    """Which draft to add to the base model, and how to run it."""

    algorithm: Algorithm = "eagle3"
    """`eagle3` (one decoder layer fed by three base layers' hidden states), `eagle1` (fed by
    the last hidden state) or `medusa` (independent heads on the last hidden state)."""
    num_draft_tokens: int = 4
    """Tokens drafted per base forward when decoding (chain drafts). Medusa needs at least this
    many heads."""
    num_medusa_heads: Optional[int] = None
    """Medusa: heads to train; None means `num_draft_tokens`."""
    num_medusa_layers: int = 1
    """Medusa: residual blocks per head."""
    draft_num_layers: int = 1
    """EAGLE: decoder layers in the draft module."""
    draft_intermediate_size: Optional[int] = None
    """EAGLE: the draft layer's MLP width; None means the base model's."""
    draft_vocab_size: Optional[int] = None
    """EAGLE: predict only the N most frequent tokens of the training data (smaller draft LM
    head, cheaper drafts; ModelOpt's `d2t` map). None means the full vocabulary."""
    ttt_steps: int = 3
    """EAGLE: training-time-test steps (the draft also learns from its own earlier outputs)."""
    attention_impl: AttentionImpl = "eager"
    """EAGLE draft attention in training: `eager` runs anywhere (CPU); ModelOpt's default
    `sdpa` path asks for cuDNN attention, so it needs a GPU; `flex_attention` likewise."""
    modelopt_overrides: dict = dataclasses.field(default_factory=dict)
    """Extra ModelOpt config entries (EagleConfig / MedusaConfig fields, or
    `eagle_architecture_config` keys under that name), applied last."""

    def __post_init__(self) -> None:
        errors = []
        if self.algorithm not in ALGORITHMS:
            errors.append(f"algorithm={self.algorithm!r}: choose one of {', '.join(ALGORITHMS)}")
        for name in ("num_draft_tokens", "num_medusa_layers", "draft_num_layers", "ttt_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                errors.append(f"{name}={getattr(self, name)!r} must be a positive integer")
        if self.num_medusa_heads is not None and self.num_medusa_heads < 1:
            errors.append(f"num_medusa_heads={self.num_medusa_heads} must be a positive integer or None")
        if (self.algorithm == "medusa" and self.num_medusa_heads is not None
                and isinstance(self.num_draft_tokens, int) and self.num_medusa_heads < self.num_draft_tokens):
            errors.append(f"num_draft_tokens={self.num_draft_tokens} needs at least as many Medusa heads "
                          f"(num_medusa_heads={self.num_medusa_heads})")
        if self.draft_vocab_size is not None and self.draft_vocab_size < 2:
            errors.append(f"draft_vocab_size={self.draft_vocab_size} must be at least 2 or None")
        if self.draft_vocab_size is not None and self.algorithm == "medusa":
            errors.append("draft_vocab_size applies to EAGLE only; leave it None for medusa")
        if self.attention_impl not in ("eager", "sdpa", "flex_attention"):
            errors.append(f"attention_impl={self.attention_impl!r}: choose eager, sdpa or flex_attention")
        if errors:
            raise SpeculativeConfigError("SpeculativeConfig: " + "; ".join(errors) + ".")

    @property
    def is_eagle(self) -> bool:
        return self.algorithm.startswith("eagle")

    @property
    def medusa_heads(self) -> int:
        return self.num_medusa_heads or self.num_draft_tokens

    def check_against_model(self, hf_config: dict) -> None:
        """Refuses settings the base model cannot take (its HF config.json as a dict)."""
        vocab = hf_config.get("vocab_size")
        if self.draft_vocab_size is not None and vocab is not None and self.draft_vocab_size > vocab:
            raise SpeculativeConfigError(
                f"SpeculativeConfig: draft_vocab_size={self.draft_vocab_size} is larger than the base "
                f"model's vocabulary ({vocab}); use a smaller value or None.")
        for key in ("medusa", "eagle", "eagle_config", "speculative_config"):
            if key in hf_config:
                raise SpeculativeConfigError(
                    f"the base model already has draft heads (config.json has {key!r}); give the model "
                    f"without them.")

    def modelopt_mode(self, hf_config: dict) -> tuple[str, dict[str, Any]]:
        """`(mode, config)` for `mtsp.convert(model, [(mode, config)])`, sized to the base
        model described by `hf_config` (its HF config.json)."""
        if self.algorithm == "medusa":
            config = {"medusa_num_heads": self.medusa_heads, "medusa_num_layers": self.num_medusa_layers}
            return "medusa", _with_overrides(config, self.modelopt_overrides)
        from modelopt.torch.speculative.config import EAGLE3_DEFAULT_CFG

        config = copy.deepcopy(EAGLE3_DEFAULT_CFG["config"])
        architecture = config["eagle_architecture_config"]
        num_heads = hf_config["num_attention_heads"]
        architecture.update({
            # the draft layer has the base model's attention shape, as in EAGLE's own drafts
            "num_hidden_layers": self.draft_num_layers,
            "intermediate_size": self.draft_intermediate_size or hf_config["intermediate_size"],
            "num_attention_heads": num_heads,
            "num_key_value_heads": hf_config.get("num_key_value_heads") or num_heads,
            "head_dim": hf_config.get("head_dim") or hf_config["hidden_size"] // num_heads,
            "rms_norm_eps": hf_config.get("rms_norm_eps", 1e-5),
            "torch_dtype": _dtype_name(hf_config),
            "_attn_implementation": self.attention_impl,
            "use_aux_hidden_state": self.algorithm == "eagle3",
            "use_last_layernorm": True,
        })
        # the base model's RoPE, not the preset's; ModelOpt >= 0.44's preset also carries the
        # theta inside rope_scaling (transformers 5's layout), so it is set there too
        theta, scaling = rope_parameters(hf_config, "the base model's config.json")
        preset_scaling = architecture.pop("rope_scaling", None) or {}
        architecture["rope_theta"] = theta
        if scaling is not None:
            architecture["rope_scaling"] = dict(scaling)
        elif "rope_theta" in preset_scaling:
            architecture["rope_scaling"] = {"rope_type": "default"}
        if "rope_theta" in preset_scaling and "rope_scaling" in architecture:
            architecture["rope_scaling"]["rope_theta"] = theta
        if self.draft_vocab_size is not None:
            architecture["draft_vocab_size"] = self.draft_vocab_size
        config["eagle_ttt_steps"] = self.ttt_steps
        config.update(compat.eagle_config_defaults())
        return "eagle", _with_overrides(config, self.modelopt_overrides)


def _dtype_name(hf_config: dict) -> str:
    name = hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32"
    return str(name).replace("torch.", "")


def _with_overrides(config: dict, overrides: dict) -> dict:
    config = copy.deepcopy(config)
    for key, value in overrides.items():
        if key == "eagle_architecture_config" and isinstance(value, dict):
            config.setdefault(key, {}).update(value)
        else:
            config[key] = value
    return config
