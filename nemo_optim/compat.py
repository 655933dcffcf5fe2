"""What nemo-optim relies on that its libraries do not promise, in one place.

Each entry is a private name or a behaviour that differs between the releases we test (the
`previous` and `current` legs: requirements/{previous,current}-constraints.txt), with the versions
it was checked on. Code elsewhere asks the accessor here instead of reaching into the library, and
`tests/test_compat.py` probes every entry against the installed versions: when a release moves
one, that test names the entry, the library version and what to update, instead of a stage
failing deep inside.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from packaging.version import Version


class LibraryMovedError(RuntimeError):
    """A library no longer has what a compat entry relies on."""


@functools.cache
def installed(distribution: str) -> Version | None:
    try:
        return Version(version(distribution))
    except PackageNotFoundError:
        return None


def at_least(distribution: str, release: str) -> bool:
    found = installed(distribution)
    return found is not None and found.release >= Version(release).release


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    distribution: str
    relies_on: str
    checked_on: tuple[str, ...]
    probe: Callable[[], Any]
    since: str | None = None
    """The entry applies from this release of `distribution` on (None: every tested release)."""

    def applies(self) -> bool:
        return self.since is None or at_least(self.distribution, self.since)

    def check(self) -> Any:
        """The probe's answer (probed once per process); a LibraryMovedError names the entry, the
        installed version and where to look."""
        if self.name in _PROBED:
            return _PROBED[self.name]
        try:
            _PROBED[self.name] = self.probe()
            return _PROBED[self.name]
        except (AttributeError, ImportError, KeyError, TypeError, AssertionError) as error:
            raise LibraryMovedError(
                f"compat entry {self.name!r}: {self.distribution} {installed(self.distribution)} no longer has "
                f"{self.relies_on} (checked on {', '.join(self.checked_on)}): {type(error).__name__}: {error}. "
                f"Update nemo_optim/compat.py for this release.") from error


ENTRIES: dict[str, Entry] = {}
_PROBED: dict[str, Any] = {}


def _entry(distribution: str, relies_on: str, *checked_on: str, since: str | None = None):
    def register(probe: Callable[[], Any]) -> Callable[[], Any]:
        ENTRIES[probe.__name__] = Entry(probe.__name__, distribution, relies_on, checked_on, probe, since)
        return probe

    return register


# --- megatron-core ---------------------------------------------------------------------------

@_entry("megatron-core", "transformer_layer.get_transformer_layer_offset(config): this pipeline stage's first "
        "layer index (not exported; TransformerLayer._get_layer_offset is deprecated in 0.19)", "0.16.1", "0.19.2")
def layer_offset_function() -> Callable[[Any], int]:
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    return get_transformer_layer_offset


def first_layer_index(model_config) -> int:
    """Index (in the whole model) of this pipeline stage's first decoder layer."""
    return ENTRIES["layer_offset_function"].check()(model_config)


@_entry("megatron-core", "filesystem_async._results_queue: the module-level queue its async writer reuses "
        "(None until first use)", "0.16.1", "0.19.2")
def writer_results_queue_module():
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    assert hasattr(filesystem_async, "_results_queue"), "filesystem_async._results_queue is gone"
    return filesystem_async


# The torch.cuda stream getters megatron calls on a CPU-only run: the CPU adjustments (runtime)
# answer them with a stream that has nothing to wait for.
CUDA_STREAM_GETTERS = ("current_stream", "default_stream")


@_entry("megatron-core", "a training step asks torch.cuda for the current stream even with gloo on CPU "
        "(0.19's param_and_grad_buffer start_grad_sync calls torch.cuda.current_stream())", "0.16.1", "0.19.2")
def cuda_stream_getters_probe() -> tuple[str, ...]:
    import inspect

    import torch
    from megatron.core.distributed import param_and_grad_buffer

    names = CUDA_STREAM_GETTERS
    for name in names:
        assert callable(getattr(torch.cuda, name)), f"torch.cuda.{name} is gone"
    assert "torch.cuda.current_stream()" in inspect.getsource(param_and_grad_buffer) or not at_least(
        "megatron-core", "0.17"), "start_grad_sync no longer asks for the current stream"
    return names


@_entry("megatron-core", "dist-checkpointing's common state: in common.pt (<= 0.16) or inside the .distcp files as "
        "'common_state' (>= 0.17, which reads both); NeMo 2's megatron (0.15) and ModelOpt 0.43 read only common.pt",
        "0.16.1", "0.19.2")
def load_common_state_function() -> Callable[[str], dict]:
    from megatron.core.dist_checkpointing.serialization import load_common_state_dict

    return load_common_state_dict


def common_state_written_to_file() -> bool:
    """Whether megatron's dist-checkpoint save writes common.pt itself (< 0.17)."""
    return not at_least("megatron-core", "0.17")


# --- ModelOpt --------------------------------------------------------------------------------

@_entry("nvidia-modelopt", "modelopt.torch.nas.modules._DynamicLayerNorm with _register_hparam / "
        "_register_dynamic_attribute (Minitron pruning of torch norms)", "0.43.0", "0.47.0")
def dynamic_layer_norm_class():
    from modelopt.torch.nas.modules import _DynamicLayerNorm

    for method in ("_register_hparam", "_register_dynamic_attribute", "_cut_to_active_features",
                   "_get_normalized_shape"):
        assert hasattr(_DynamicLayerNorm, method), f"_DynamicLayerNorm.{method} is gone"
    return _DynamicLayerNorm


def minitron_needs_transformer_engine() -> bool:
    """ModelOpt >= 0.44's Minitron pruning imports Transformer Engine unguarded and prunes only TE
    layers (`transformer_impl="transformer_engine"`, a CUDA machine); 0.43 prunes megatron's local
    layers too."""
    return at_least("nvidia-modelopt", "0.44")


@_entry("nvidia-modelopt", "quant_cfg presets as a dict (<= 0.43) or an ordered list of entries (>= 0.44)",
        "0.43.0", "0.47.0")
def quant_cfg_uses_list_form() -> bool:
    import modelopt.torch.quantization as mtq

    quant_cfg = mtq.FP8_DEFAULT_CFG["quant_cfg"]
    assert isinstance(quant_cfg, (dict, list)), f"FP8_DEFAULT_CFG['quant_cfg'] is a {type(quant_cfg).__name__}"
    return isinstance(quant_cfg, list)


@_entry("nvidia-modelopt", "the GPTQ calibration mode's name: gptq_lite (<= 0.43) or gptq (>= 0.44)",
        "0.43.0", "0.47.0")
def gptq_method() -> str:
    from modelopt.torch.quantization.mode import CalibrateModeRegistry

    for name in ("gptq_lite", "gptq"):
        if f"{name}_calibrate" in CalibrateModeRegistry:
            return name
    raise KeyError("neither gptq_lite_calibrate nor gptq_calibrate is registered")


@_entry("nvidia-modelopt", "gptq returns before its Hessian forward pass on a model (pipeline stage) without an "
        "enabled weight quantizer", "0.47.0", since="0.44")
def gptq_early_return_probe() -> bool:
    import inspect

    from modelopt.torch.quantization import model_calib

    source = inspect.getsource(model_calib.gptq)
    assert "if not quantized_layers" in source and source.index("if not quantized_layers") < source.index(
        "forward_loop(model)"), "gptq's early return moved"
    return True


def gptq_skips_hessian_pass_without_layers() -> bool:
    return ENTRIES["gptq_early_return_probe"].applies()


@_entry("nvidia-modelopt", "layer-wise calibration with a resumable checkpoint_dir for megatron models "
        "(algorithm {'layerwise': {'enable', 'checkpoint_dir'}})", "0.47.0", since="0.46")
def layerwise_calibration_config_class():
    from modelopt.torch.quantization.config import LayerwiseConfig

    assert {"enable", "checkpoint_dir"} <= set(LayerwiseConfig.model_fields), "LayerwiseConfig fields changed"
    return LayerwiseConfig


def resumable_layerwise_calibration() -> bool:
    return ENTRIES["layerwise_calibration_config_class"].applies()


def with_layerwise_checkpoint(algorithm: dict, checkpoint_dir: str) -> dict:
    """A calibration step of `mtq.quantize`'s algorithm run layer by layer, recording each finished
    layer in `checkpoint_dir` so a killed calibration resumes after the last one."""
    ENTRIES["layerwise_calibration_config_class"].check()
    return {**algorithm, "layerwise": {"enable": True, "checkpoint_dir": checkpoint_dir}}


@_entry("nvidia-modelopt", "auto_quantize's QuantRecipe str() as 'NAME(effective-bits: N)'", "0.43.0", "0.47.0")
def auto_quantize_recipe_class():
    from modelopt.torch.quantization.algorithms import QuantRecipe

    name = str(QuantRecipe(quant_cfg=None))
    assert name.startswith("NONE("), f"str(QuantRecipe(None)) is {name!r}"
    return QuantRecipe


def auto_quantize_recipe_name(recipe) -> str:
    """ModelOpt's name of an auto_quantize format: a preset it recognises (INT8_SMOOTHQUANT_CFG),
    CUSTOM_<index> or NONE."""
    return str(recipe).split("(", 1)[0]


# raised by auto_quantize for an effective-bits target no format mix reaches: AssertionError below
# the most aggressive format's bits (every version), ValueError for the resolved search space (>= 0.46)
AUTO_QUANTIZE_INFEASIBLE = (AssertionError, ValueError)


@_entry("nvidia-modelopt", "auto_quantize's scoring keeps each module's per-format output errors in "
        "module.output_diff_dict until that module's backward hook", "0.43.0", "0.47.0")
def auto_quantize_output_errors_attribute() -> str:
    import inspect

    from modelopt.torch.quantization import algorithms

    assert "output_diff_dict" in inspect.getsource(algorithms), "output_diff_dict is no longer used"
    return "output_diff_dict"


@_entry("nvidia-modelopt", "AutoQuantizeGradientSearcher._custom_support: (checker, context, grad filter) entries, the "
        "first matching one used; ModelOpt >= 0.44 registers a megatron entry that recomputes nothing",
        "0.43.0", "0.47.0")
def auto_quantize_support_list() -> list:
    from modelopt.torch.quantization.algorithms import AutoQuantizeGradientSearcher

    support = AutoQuantizeGradientSearcher._custom_support
    assert isinstance(support, list), f"_custom_support is a {type(support).__name__}"
    return support


def register_auto_quantize_support_first(is_supported, grad_ckpt_context, is_param_grad_enabled) -> None:
    """ModelOpt's `register_custom_support`, ahead of the entries already registered (its own
    megatron entry would otherwise win for GPTModel)."""
    from modelopt.torch.quantization.algorithms import AutoQuantizeGradientSearcher

    support = ENTRIES["auto_quantize_support_list"].check()
    AutoQuantizeGradientSearcher.register_custom_support(is_supported, grad_ckpt_context, is_param_grad_enabled)
    ours = next(i for i, entry in enumerate(support) if entry[0] is is_supported)
    support.insert(0, support.pop(ours))


def drop_auto_quantize_output_errors(module) -> None:
    attribute = ENTRIES["auto_quantize_output_errors_attribute"].check()
    if getattr(module, attribute, None):
        setattr(module, attribute, {})


@_entry("nvidia-modelopt", "the HF EAGLE model's _eagle_forward(features, embeddings, mask, positions, cache), "
        "_prepare_decoder_attention_mask and _base_model_embeddings", "0.43.0", "0.47.0")
def hf_eagle_model_class():
    import inspect

    try:
        from modelopt.torch.speculative.plugins.hf_eagle import HFEagleModel
    except ImportError:  # <= 0.44
        from modelopt.torch.speculative.plugins.transformers import HFEagleModel
    for name in ("_eagle_forward", "_prepare_decoder_attention_mask", "_base_model_embeddings"):
        assert hasattr(HFEagleModel, name), f"HFEagleModel.{name} is gone"
    parameters = list(inspect.signature(HFEagleModel._eagle_forward).parameters)[1:6]
    assert len(parameters) == 5, f"_eagle_forward takes {parameters}"
    return HFEagleModel


def eagle_draft_forward(model, features, tokens, past: int, cache):
    """One EAGLE draft forward over `tokens` after `past` cached positions: (pre-norm hidden,
    the first draft head's logits [batch, seq, vocab], cache). ModelOpt <= 0.44 returns a list of
    logits (one per parallel draft head), later ones one tensor; >= 0.45 builds the draft's rotary
    embedding only when asked (`_maybe_init_rope`)."""
    import torch

    ENTRIES["hf_eagle_model_class"].check()
    init_rope = getattr(model.eagle_module, "_maybe_init_rope", None)
    if init_rope is not None:
        init_rope(device=features.device)
    length = tokens.shape[1]
    mask = model._prepare_decoder_attention_mask(None, (1, length), past, features.device, features.dtype)
    positions = torch.arange(past, past + length, device=features.device).view(1, -1)
    _, prenorm, logits, cache = model._eagle_forward(features, model._base_model_embeddings(tokens), mask,
                                                     positions, cache)
    return prenorm, logits[0] if isinstance(logits, (list, tuple)) else logits, cache


def eagle_config_defaults() -> dict:
    """Settings every EAGLE conversion gets: ModelOpt >= 0.44 compiles the draft with
    torch.compile(fullgraph=True) by default, which fails on CPU and is not ours to choose."""
    from modelopt.torch.speculative.config import EagleConfig

    return {"eagle_use_torch_compile": False} if "eagle_use_torch_compile" in EagleConfig.model_fields else {}


# --- transformers --------------------------------------------------------------------------

# transformers 5 saves a tokenizer.json-backed tokenizer as "TokenizersBackend", a class transformers
# 4 (NeMo 2.7's) does not have; both read "PreTrainedTokenizerFast" as that tokenizer
TOKENIZER_CLASSES_FOR_TRANSFORMERS4 = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def tokenizer_readable_by_transformers4(tokenizer_dir) -> None:
    """Rewrites `tokenizer_config.json` in `tokenizer_dir` with a tokenizer class transformers 4 has."""
    import json
    from pathlib import Path

    path = Path(tokenizer_dir) / "tokenizer_config.json"
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    if config.get("tokenizer_class") in TOKENIZER_CLASSES_FOR_TRANSFORMERS4:
        config["tokenizer_class"] = TOKENIZER_CLASSES_FOR_TRANSFORMERS4[config["tokenizer_class"]]
        path.write_text(json.dumps(config, indent=2) + "\n")


# --- fiddle ----------------------------------------------------------------------------------

FIDDLE_CONFIG = "fiddle._src.config.Config"
FIDDLE_TRAVERSER_METADATA = "fiddle._src.config.BuildableTraverserMetadata"


@_entry("fiddle", f"the class paths NeMo 2's io.json names: {FIDDLE_CONFIG}, {FIDDLE_TRAVERSER_METADATA}", "0.3.1")
def fiddle_class_paths() -> tuple[str, ...]:
    import fiddle

    for path in (FIDDLE_CONFIG, FIDDLE_TRAVERSER_METADATA):
        module, _, name = path.rpartition(".")
        getattr(import_module(module), name)
    assert import_module("fiddle._src.config").Config is fiddle.Config, "fiddle.Config moved"
    return FIDDLE_CONFIG, FIDDLE_TRAVERSER_METADATA
