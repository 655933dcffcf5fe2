"""PTQ steps as functions in ModelOpt's own shape (`mtq.quantize(model, config, forward_loop)`),
each taking the `QuantizationConfig` and returning what it produces:

    modelopt_quantization_config(config, model) -> the dict `mtq.quantize` takes
    calibration_loop(config, tokenizer)          -> the forward loop over the calibration rows
    quantize(model, config, forward_loop)        -> (quantized model, QuantizationSummary)
    auto_quantize(model, config, tokenizer)      -> (model with per-layer formats, QuantizationSummary)
    export_quantized(model, config, export, ...) -> the verified export's path
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from nemo_optim import compat, runtime
from nemo_optim.checkpoint import atomic_directory, stored_quantization_settings
from nemo_optim.data.packing import packed_sequences
from nemo_optim.models.forward import forward_only, make_batch, output_layer_skipped
from nemo_optim.models.hf import write_hf_export
from nemo_optim.progress import progress, progress_over_layers
from nemo_optim.quantization import auto_quantize_scoring, gptq_passes, modelopt_config
from nemo_optim.quantization.compressed_tensors import SCHEMES as COMPRESSED_TENSORS_SCHEMES
from nemo_optim.quantization.compressed_tensors import write_compressed_tensors
from nemo_optim.quantization.config import (
    ALGORITHMS,
    BLOCKED,
    LAYERWISE_FILES,
    TUNED_CALIBRATION,
    ExportConfig,
    QuantizationConfig,
    QuantizationConfigError,
)

ForwardLoop = Callable[[torch.nn.Module], None]
DECODER_TYPES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen", "Qwen3ForCausalLM": "qwen"}


class ExportVerificationError(RuntimeError):
    """An export that does not contain the format that was asked for."""


@dataclasses.dataclass
class QuantizationSummary:
    algorithm: str | None
    enabled_quantizers: int
    quantized_linear_share: float
    """Share of decoder linear weight elements that have an enabled weight quantizer."""
    effective_bits: float
    """Bits per decoder linear weight, scales included (unquantized weights count at 16)."""
    per_layer_formats: dict[str, str] = dataclasses.field(default_factory=dict)
    """auto_quantize only: the format chosen for each layer."""

    def line(self) -> str:
        return (f"quantized {self.algorithm}: {self.enabled_quantizers} quantizers, "
                f"{100 * self.quantized_linear_share:.1f}% of decoder linear weights, "
                f"{self.effective_bits:.2f} effective bits/weight")


def is_quantized(model: torch.nn.Module) -> bool:
    """Whether `model` carries an enabled ModelOpt quantizer (a PTQ / QAD checkpoint)."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    return any(isinstance(m, TensorQuantizer) and m.is_enabled for m in model.modules())


def stored_quantization_config(path: Path) -> QuantizationConfig | None:
    """The QuantizationConfig a quantized native checkpoint was calibrated with (its manifest);
    None for other model sources."""
    stored = stored_quantization_settings(path)
    return QuantizationConfig(**stored) if stored else None


def summarize(model: torch.nn.Module, algorithm: str | None) -> QuantizationSummary:
    """Counts what ModelOpt quantized: the evidence that no layer was quietly left out."""
    from modelopt.torch.quantization.nn import SequentialQuantizer, TensorQuantizer

    enabled = sum(1 for m in model.modules() if isinstance(m, TensorQuantizer) and m.is_enabled)
    total = quantized = 0
    bits_sum = 0.0
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if ".layers." not in f".{name}" or weight is None or weight.dim() != 2:
            continue
        numel = weight.numel()
        total += numel
        quantizer = getattr(module, "weight_quantizer", None)
        if quantizer is None:
            bits_sum += 16 * numel
            continue
        first = quantizer[0] if isinstance(quantizer, SequentialQuantizer) else quantizer
        if not first.is_enabled:
            bits_sum += 16 * numel
            continue
        quantized += numel
        num_bits = first.num_bits
        element_bits = float(sum(num_bits) + 1) if isinstance(num_bits, tuple) else float(num_bits)
        block = (first.block_sizes or {}).get(-1) if isinstance(first.block_sizes, dict) else None
        if block:
            scale_bits = 16 / block  # one fp16 scale per block
        elif first.axis is not None:
            scale_bits = 32 * weight.shape[0] / numel  # one fp32 scale per output channel
        else:
            scale_bits = 32 / numel
        bits_sum += (element_bits + scale_bits) * numel
    return QuantizationSummary(
        algorithm=algorithm,
        enabled_quantizers=enabled,
        quantized_linear_share=quantized / total if total else 0.0,
        effective_bits=bits_sum / total if total else 16.0,
    )


def attention_has_kv_quantizers(model: torch.nn.Module) -> bool:
    """Only Transformer Engine attention gets KV-cache quantizers in ModelOpt's megatron plugin."""
    return any(type(m).__name__ == "TEDotProductAttention" for m in model.modules())


def check_block_size(model: torch.nn.Module, block_size: int, formats: list[str]) -> None:
    """Blocked INT4 formats need `block_size` to divide every linear layer's input size: ModelOpt
    calibrates a ragged last block but its INT4 packing at export fails (SmolLM2's hidden size
    576 and block 128). Checked before calibration, so no work is lost."""
    blocked = [fmt for fmt in formats if fmt in BLOCKED]
    config = getattr(model, "config", None)
    if not blocked or config is None:
        return
    # row-parallel layers (attention output, MLP down projection) see 1/TP of their inputs
    tp = getattr(config, "tensor_model_parallel_size", 1) or 1
    inputs = {"hidden": config.hidden_size, "attention": config.num_attention_heads * config.kv_channels // tp,
              "MLP": config.ffn_hidden_size // tp}
    if all(size % block_size == 0 for size in inputs.values()):
        return
    common = math.gcd(*inputs.values())
    largest = common & -common  # the largest power of two that divides every input size
    sizes = ", ".join(f"{name} {size}" for name, size in inputs.items())
    sizes += f" per TP rank at TP={tp}" if tp > 1 else ""
    fix = (f"use awq_block_size={min(largest, 128)} or another power of two dividing them" if largest >= 8 else
           "no block size >= 8 does: use a per-channel format (int8_wo, fp8)")
    raise QuantizationConfigError(
        f"quantization_config.awq_block_size={block_size} does not divide the input sizes of the model's linear "
        f"layers ({sizes}), so the {'/'.join(blocked)} export would fail; {fix}.")


# --- the ModelOpt config -------------------------------------------------------------------------

def kv_cache_enabled(config: QuantizationConfig, model: torch.nn.Module) -> bool:
    if config.enable_kv_cache is None:  # NeMo 2's default: on for fp8/nvfp4 where supported
        return config.algorithm in ("fp8", "fp8_pc_pt", "nvfp4") and attention_has_kv_quantizers(model)
    if config.enable_kv_cache and not attention_has_kv_quantizers(model):
        raise QuantizationConfigError(
            "quantization_config.enable_kv_cache=True needs Transformer Engine attention "
            "(transformer_impl=modelopt or transformer_engine, on GPU); the local spec used on CPU "
            "has no KV-cache quantizers. Set enable_kv_cache=False."
        )
    return config.enable_kv_cache


def modelopt_quantization_config(config: QuantizationConfig, model: torch.nn.Module) -> dict[str, Any]:
    """The ModelOpt config `mtq.quantize` takes (in the installed ModelOpt's form) for `model`."""
    if config.custom_config_path:
        path = Path(config.custom_config_path)
        if not path.is_file():
            raise QuantizationConfigError(f"quantization_config.custom_config_path={str(path)!r}: file not found.")
        try:
            custom = modelopt_config.from_json(json.loads(path.read_text()))
            quant_cfg = custom["quant_cfg"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise QuantizationConfigError(
                f"quantization_config.custom_config_path={str(path)!r}: not a ModelOpt config "
                f'({{"quant_cfg": ..., "algorithm": ...}}): {error}'
            ) from None
        entries, algorithm = modelopt_config.entries_from_modelopt(quant_cfg), custom.get("algorithm", "max")
    else:
        entries, preset_algorithm = modelopt_config.preset_entries(ALGORITHMS[config.algorithm][0])
        if config.algorithm in BLOCKED:
            modelopt_config.set_block_size(entries, config.awq_block_size)
        algorithm = calibration_algorithm(config, preset_algorithm)
    if kv_cache_enabled(config, model):
        kv_preset = "FP8_KV_CFG" if config.kv_cache_qformat == "fp8" else "NVFP4_KV_CFG"
        kv_entries, _ = modelopt_config.preset_entries(kv_preset)
        entries += [e for e in kv_entries if e["quantizer_name"] != "default"]
    entries += [{"quantizer_name": pattern, "enable": False} for pattern in config.exclude_modules]
    entries += [{"quantizer_name": pattern, "enable": False} for pattern in excluded_layer_patterns(config, model)]
    return {"quant_cfg": modelopt_config.entries_to_modelopt(entries), "algorithm": algorithm}


def calibration_algorithm(config: QuantizationConfig, preset_algorithm: Any, methods: list[str] | None = None) -> Any:
    """ModelOpt's `algorithm` argument for `methods` (default: `config`'s, layer-wise ones when its
    calibration is resumable): one method, or a list that ModelOpt runs in order."""
    steps = []
    default = config.layerwise_methods() if config.calibration_checkpoint_dir else config.calibration_methods()
    for method in methods or default:
        if method == "preset":
            step = {"method": preset_algorithm} if isinstance(preset_algorithm, str) else dict(preset_algorithm)
        else:
            step = {"method": method}
        if step["method"] == "smoothquant" and config.sq_alpha is not None:
            step["alpha"] = config.sq_alpha
        elif step["method"] == "gptq_lite":
            step["method"] = compat.gptq_method()
            # GPTQ's update block must hold whole quantization blocks
            step["block_size"] = max(128, config.awq_block_size)
        steps.append(step)
    return steps[0] if len(steps) == 1 else steps


def excluded_layer_patterns(config: QuantizationConfig, model: torch.nn.Module) -> list[str]:
    """Patterns for the first/last N decoder layers. Module names use this pipeline stage's
    local indices, so layers are picked by their global `layer_number`."""
    total = model.config.num_layers
    if config.exclude_first_layers + config.exclude_last_layers >= total:
        raise QuantizationConfigError(
            f"quantization_config: exclude_first_layers + exclude_last_layers = "
            f"{config.exclude_first_layers + config.exclude_last_layers} leaves none of the {total} layers quantized."
        )
    keep = (set(range(1, config.exclude_first_layers + 1))
            | set(range(total - config.exclude_last_layers + 1, total + 1)))
    return [f"decoder.layers.{index}.*" for index, layer in enumerate(model.decoder.layers)
            if layer.layer_number in keep]


# --- calibration ----------------------------------------------------------------------------------

def calibration_batches(config: QuantizationConfig, tokenizer) -> list[torch.Tensor]:
    rows = packed_sequences(config.calibration_data(), "calibration", tokenizer, config.calibration_dataset_size)
    return list(rows.split(config.calibration_batch_size))


def output_layer_quantized(model: torch.nn.Module) -> bool:
    """Whether any enabled quantizer sits in the output layer (the presets disable it)."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    output_layer = getattr(model, "output_layer", None)
    return output_layer is not None and any(
        isinstance(m, TensorQuantizer) and m.is_enabled for m in output_layer.modules())


def calibration_loop(config: QuantizationConfig, tokenizer) -> ForwardLoop:
    """The forward loop ModelOpt calibrates with: `config`'s calibration rows through the model."""
    batches = calibration_batches(config, tokenizer)

    def forward_loop(model: torch.nn.Module) -> None:
        # ModelOpt may run it more than once (AWQ, SmoothQuant, GPTQ-lite, auto_quantize). Its
        # quantizers are in place by now: the logits are skipped unless the output layer has one,
        # or calibration is layer-wise (ModelOpt runs the output layer as its last step)
        skip = (output_layer_skipped(model)
                if not output_layer_quantized(model) and not config.calibration_checkpoint_dir
                else contextlib.nullcontext())
        with skip:
            for batch in progress(batches, description="calibration"):
                forward_only(model, batch)

    return forward_loop


# --- quantize -------------------------------------------------------------------------------------

def quantize(model: torch.nn.Module, config: QuantizationConfig, forward_loop: ForwardLoop | None = None,
             tokenizer=None) -> tuple[torch.nn.Module, QuantizationSummary | None]:
    """`mtq.quantize` with `config`: inserts quantizers, calibrates (with `forward_loop`, or
    `config`'s calibration rows tokenized by `tokenizer`). Returns the (fake-)quantized model and
    what was quantized (None when `config` quantizes nothing)."""
    if config.algorithm is None and not config.custom_config_path:
        return model, None
    if config.algorithm is not None:
        check_block_size(model, config.awq_block_size, [config.algorithm])
    if forward_loop is None:
        if tokenizer is None:
            raise ValueError("quantize needs a forward_loop or a tokenizer to build one.")
        forward_loop = calibration_loop(config, tokenizer)
    model.eval()
    if config.calibration_checkpoint_dir:
        model = _quantize_layerwise(model, config, forward_loop)
    else:
        model = gptq_passes.quantize(model, modelopt_quantization_config(config, model), forward_loop,
                                     compat.gptq_method(), config.gptq_hessian_budget)
    summary = summarize(model, config.algorithm or "custom")
    runtime.print0(summary.line())
    return model, summary


def _quantize_layerwise(model: torch.nn.Module, config: QuantizationConfig,
                        forward_loop: ForwardLoop) -> torch.nn.Module:
    """ModelOpt's layer-wise calibration with a checkpoint per finished layer: a rerun after a kill
    resumes after the last one (same settings, same calibration rows)."""
    import shutil

    import modelopt.torch.quantization as mtq

    config.check_layerwise_checkpoint(runtime.world_size())
    modelopt_cfg = modelopt_quantization_config(config, model)
    algorithm = modelopt_cfg["algorithm"]
    if not isinstance(algorithm, (str, dict)):
        raise QuantizationConfigError(
            f"quantization_config.calibration_checkpoint_dir: the custom config's algorithm is {algorithm!r}; "
            f"layer-wise calibration takes one step (a method name or dict).")
    modelopt_cfg["algorithm"] = compat.with_layerwise_checkpoint(
        {"method": algorithm} if isinstance(algorithm, str) else algorithm, config.calibration_checkpoint_dir)
    model = mtq.quantize(model, modelopt_cfg, forward_loop)
    # finished: nothing left to resume; only what ModelOpt wrote is removed
    directory = Path(config.calibration_checkpoint_dir)
    for written in [path for path in directory.glob("*") if path.name.startswith(LAYERWISE_FILES)]:
        if written.is_dir():
            shutil.rmtree(written)
        else:
            written.unlink()
    with contextlib.suppress(OSError):
        directory.rmdir()
    return model


def auto_quantize(model: torch.nn.Module, config: QuantizationConfig, tokenizer,
                  fresh_model: Callable[[], torch.nn.Module] | None = None
                  ) -> tuple[torch.nn.Module, QuantizationSummary]:
    """ModelOpt `auto_quantize`: per-layer formats among `config.auto_quantize_formats` under
    `config.auto_quantize_bits` effective bits (PP=1).

    The search's sensitivity pass is a forward + backward that keeps a candidate layer's output
    error per format until its gradient arrives; `auto_quantize_scoring` runs it one row and one
    recomputed decoder layer at a time, with the scores of the whole `config.calibration_batch_size`
    batch, under the 1 MiB mmap threshold (SmolLM2: 1.35x the fp32 weights instead of ~9x;
    benchmarks/results/cost_curves.md).

    `fresh_model` loads the unquantized model again: the chosen formats are then quantized
    and calibrated on it with `auto_quantize_recalibration` (ModelOpt's quantize on the
    searched model itself re-calibrates badly: a tiny Llama's KL to fp32 doubled). The searched
    `model`'s tensors are released first (moved to the meta device), so only one copy of the
    weights is resident: use the returned model, not the one passed in."""
    import modelopt.torch.quantization as mtq
    from megatron.core import parallel_state

    effective_bits, formats = config.auto_quantize_bits, config.auto_quantize_formats
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        raise QuantizationConfigError("auto_quantize_bits needs calibration_pp=1.")
    check_block_size(model, config.awq_block_size, formats)
    format_configs = []
    for fmt in formats:
        entries, algorithm = modelopt_config.preset_entries(ALGORITHMS[fmt][0])
        if fmt in BLOCKED:
            modelopt_config.set_block_size(entries, config.awq_block_size)
        format_configs.append({"quant_cfg": modelopt_config.entries_to_modelopt(entries), "algorithm": algorithm})
    batches = [make_batch(rows) for rows in calibration_batches(config, tokenizer)]

    auto_quantize_scoring.register_megatron_scoring()
    with _infeasible_bits_refused(config):
        model, search_state = mtq.auto_quantize(
            model,
            constraints={"effective_bits": effective_bits},
            quantization_formats=format_configs,
            data_loader=batches,
            forward_step=auto_quantize_scoring.forward_step,
            forward_backward_step=auto_quantize_scoring.forward_backward_step,
            disabled_layers=["*output_layer*"],
            num_calib_steps=len(batches),
            num_score_steps=len(batches),
        )
    recalibration = auto_quantize_recalibration(config)
    if recalibration is not None and fresh_model is not None:
        # the search calibrated every candidate with its preset's method (max); the chosen
        # formats now get the tuned calibration (SmolLM2 int4+int8_wo: +26.3% -> +22.1% ppl)
        with warnings.catch_warnings():
            # "uses algorithm='max'": replaced here
            warnings.filterwarnings("ignore", message="get_auto_quantize_config")
            chosen = mtq.get_auto_quantize_config(search_state)
        chosen["algorithm"] = recalibration
        model.to_empty(device="meta")  # the caller's reference stays; its weights need not
        del model
        model = fresh_model()
        model.eval()
        model = gptq_passes.quantize(model, chosen, calibration_loop(config, tokenizer), compat.gptq_method(),
                                     config.gptq_hessian_budget)
    elif recalibration is not None:
        runtime.print0("auto_quantize: no fresh_model given, the chosen formats keep the search's max calibration.")
    summary = summarize(model, f"auto_quantize({effective_bits} bits: {', '.join(formats)})")
    best = search_state["best"]
    # ModelOpt names a format by the preset it recognises (INT8_SMOOTHQUANT_CFG), else
    # CUSTOM_<index in quantization_formats>; NONE is "not quantized"
    by_preset = {ALGORITHMS[fmt][0]: fmt for fmt in formats}
    for layer, recipe in best["recipe"].items():
        name = compat.auto_quantize_recipe_name(recipe)
        if name.startswith("CUSTOM_"):
            layer_format = formats[int(name.split("_")[1])]
        else:
            layer_format = by_preset.get(name.upper(), name.lower())
        summary.per_layer_formats[layer.removesuffix(".quant_recipe")] = layer_format
    if not best.get("is_satisfied", True):
        runtime.print0(f"auto_quantize: {effective_bits} effective bits is not reachable with {formats} "
                       f"(ModelOpt counts unquantized layers at 16 bits); used the lowest-bit choice.")
    runtime.print0(summary.line())
    for layer, layer_format in summary.per_layer_formats.items():
        runtime.print0(f"  {layer}: {layer_format}")
    return model, summary


@contextlib.contextmanager
def _infeasible_bits_refused(config: QuantizationConfig):
    """ModelOpt >= 0.46 refuses an effective-bits target below what its formats reach (0.43 used
    the fewest-bit choice and said so): one line naming the field and the reachable minimum."""
    try:
        yield
    except compat.AUTO_QUANTIZE_INFEASIBLE as error:
        if "infeasible" not in str(error) and "cannot be lower" not in str(error):
            raise
        raise QuantizationConfigError(
            f"quantization_config.auto_quantize_bits={config.auto_quantize_bits} is not reachable with "
            f"{config.auto_quantize_formats} (ModelOpt counts unquantized layers at 16 bits: {error}); raise "
            f"auto_quantize_bits or add a format with fewer bits.") from None


def auto_quantize_recalibration(config: QuantizationConfig) -> Any | None:
    """ModelOpt `algorithm` to re-calibrate auto_quantize's chosen formats with, or None to
    keep the search's calibration: `calibration_algorithm` if given, else max + GPTQ-lite
    when every candidate format is one whose tuned default is GPTQ-lite."""
    if config.calibration_algorithm:
        methods = config.calibration_algorithm.split("+")
    elif all(fmt in TUNED_CALIBRATION for fmt in config.auto_quantize_formats):
        methods = ["max", "gptq_lite"]
    else:
        return None  # SmoothQuant / AWQ formats: the search already ran their preset method
    if methods == ["preset"]:
        return None
    return calibration_algorithm(config, "max", methods)


# --- export ---------------------------------------------------------------------------------------

def expected_export_algos(config: QuantizationConfig, export_format: str = "hf") -> set[str] | None:
    """quant_algo values the export may declare (None: no check, e.g. a custom config)."""
    if config.auto_quantize_bits is not None:  # one format everywhere is declared as that format
        return {"MIXED_PRECISION"} | {ALGORITHMS[fmt][1] for fmt in config.auto_quantize_formats}
    if config.custom_config_path or config.algorithm is None:
        return None
    if export_format == "compressed_tensors":
        return {COMPRESSED_TENSORS_SCHEMES[config.algorithm][2]}
    return {ALGORITHMS[config.algorithm][1]}


def export_quantized(model: torch.nn.Module, config: QuantizationConfig, export: ExportConfig, hf_dir: Path,
                     hf_architecture: str, *, release_model: bool = False) -> Path:
    """Exports `model` (quantized with `config`) to `export.path` and verifies that the result
    declares `config`'s format before it appears there. `release_model`: the caller is done with
    `model`, whose layers the unified HF export may free as it goes (`write_hf_export`)."""
    with atomic_directory(export.path) as shared_tmp, tempfile.TemporaryDirectory() as scratch:
        # Data-parallel replicas export the same weights: only replica 0 writes the result.
        tmp = shared_tmp if runtime.data_parallel_rank() == 0 else Path(scratch)
        if export.export_format == "hf":
            write_hf_export(model, hf_dir, tmp, export.torch_dtype, release_exported_layers=release_model)
        elif export.export_format == "compressed_tensors":  # (from one process: the ptq stage's export)
            write_compressed_tensors(model, config, hf_dir, tmp, export.torch_dtype)
        else:
            from modelopt.torch.export import export_tensorrt_llm_checkpoint

            with tied_embeddings_declared(model), \
                    progress_over_layers(model.decoder.layers, "export", keep_type=True):
                export_tensorrt_llm_checkpoint(
                    model, export.decoder_type or DECODER_TYPES[hf_architecture], export.torch_dtype, str(tmp),
                    inference_tensor_parallel=export.inference_tp, inference_pipeline_parallel=export.inference_pp,
                )
        runtime.barrier()
        if runtime.is_main_process():
            verify_export(Path(tmp), export.export_format, expected_export_algos(config, export.export_format),
                          shown_path=export.path)
    return Path(export.path)


@contextlib.contextmanager
def tied_embeddings_declared(model: torch.nn.Module):
    """ModelOpt's TensorRT-LLM exporter reads `share_embeddings_and_output_weights` from the
    model's config, where megatron-core does not keep it (the GPTModel does): without it, a tied
    model's output layer (weight None, e.g. SmolLM2) crashed the export."""
    config = model.config
    missing = object()
    previous = getattr(config, "share_embeddings_and_output_weights", missing)
    config.share_embeddings_and_output_weights = bool(getattr(model, "share_embeddings_and_output_weights", False))
    try:
        yield
    finally:
        if previous is missing:
            del config.share_embeddings_and_output_weights
        else:
            config.share_embeddings_and_output_weights = previous


def declared_quant_algo(path: Path, export_format: str) -> str | None:
    """The quantization an export declares (None: an unquantized export); a compressed-tensors
    export declares its format (int-quantized, float-quantized, pack-quantized)."""
    if export_format == "compressed_tensors":
        quantization = json.loads((path / "config.json").read_text()).get("quantization_config") or {}
        return quantization.get("format") if quantization.get("quant_method") == "compressed-tensors" else None
    if export_format == "hf":
        quant_file = path / "hf_quant_config.json"
        if not quant_file.is_file():
            return None
        return json.loads(quant_file.read_text()).get("quantization", {}).get("quant_algo")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ExportVerificationError(f"{path}: no config.json in the TensorRT-LLM export.")
    return (json.loads(config_file.read_text()).get("quantization") or {}).get("quant_algo")


def _safetensors_dtypes(path: Path) -> set[str]:
    dtypes = set()
    for file in path.glob("*.safetensors"):
        with file.open("rb") as handle:
            header_size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(header_size))
        dtypes |= {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    return dtypes


def verify_export(path: Path, export_format: str, expected: set[str] | None, shown_path: str | None = None) -> None:
    """Fails when the export does not carry the requested format (ModelOpt issues #1255, #868:
    exports that silently came out in BF16)."""
    shown = shown_path or str(path)
    declared = declared_quant_algo(path, export_format)
    if expected is None:
        return
    wanted = " or ".join(sorted(expected))
    if declared is None:
        raise ExportVerificationError(
            f"export {shown} declares no quantization although {wanted} was requested: the "
            f"exporter wrote unquantized weights. ModelOpt's megatron HF exporter writes FP8/NVFP4 "
            f"unified checkpoints only; use export_config.export_format=trtllm for this format."
        )
    if declared not in expected:
        raise ExportVerificationError(f"export {shown} declares quant_algo={declared!r}, but {wanted} was requested.")
    if declared.startswith("FP8") and "F8_E4M3" not in _safetensors_dtypes(path):
        raise ExportVerificationError(f"export {shown} declares {declared} but holds no FP8 (F8_E4M3) tensors.")
