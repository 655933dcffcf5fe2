"""Typed PTQ and export settings. Field names follow NeMo 2's `llm.ptq` where they mean the same.

# No `from __future__ import annotations`: NeMo-Run's CLI parser reads these annotations.
"""

import dataclasses
from pathlib import Path
from typing import Literal, Optional

import torch

from nemo_optim import compat
from nemo_optim.data.corpus import DataConfig
from nemo_optim.errors import InputError

# algorithm -> (ModelOpt preset, format the exported checkpoint must declare)
ALGORITHMS: dict[str, tuple[str, str]] = {
    "fp8": ("FP8_DEFAULT_CFG", "FP8"),
    "fp8_pc_pt": ("FP8_PER_CHANNEL_PER_TOKEN_CFG", "FP8_PER_CHANNEL_PER_TOKEN"),
    "block_fp8": ("FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG", "FP8_PB_WO"),
    "int8": ("INT8_DEFAULT_CFG", "W8A8_SQ_PER_CHANNEL"),
    "int8_sq": ("INT8_SMOOTHQUANT_CFG", "W8A8_SQ_PER_CHANNEL"),
    "int8_wo": ("INT8_WEIGHT_ONLY_CFG", "W8A16"),
    "int4": ("INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "W4A16_AWQ"),
    "int4_awq": ("INT4_AWQ_CFG", "W4A16_AWQ"),
    "w4a8_awq": ("W4A8_AWQ_BETA_CFG", "W4A8_AWQ"),
    "nvfp4": ("NVFP4_DEFAULT_CFG", "NVFP4"),
}
NEEDS_CUDA = ("nvfp4",)
# the calibration method of each preset that is not plain "max"
PRESET_METHODS = {"int8_sq": "smoothquant", "int4_awq": "awq_lite", "w4a8_awq": "awq_lite"}
# ModelOpt calibration methods `calibration_algorithm` may chain with "+"; "preset" is the
# preset's own method (NeMo 2's behaviour).
CALIBRATION_METHODS = ("preset", "max", "mse", "smoothquant", "awq_lite", "awq_clip", "awq_full", "gptq_lite")
# Methods that rescale inputs (pre-quant scales) or leave their calibrator attached: ModelOpt
# 0.43's gptq_lite cannot follow them (its Hessian hook reads the module's raw input, not the
# input the pre-quant scale multiplies, so it would optimise the wrong objective).
NOT_BEFORE_GPTQ = ("mse", "smoothquant", "awq_lite", "awq_clip", "awq_full")
# nemo-optim's default per algorithm: the preset's method, then GPTQ-lite error compensation of
# the weights (SmolLM2-135M, benchmarks/results/ptq.md: FP8 KL to fp32 0.035 -> 0.025).
TUNED_CALIBRATION = {
    "fp8": "preset+gptq_lite",
    "fp8_pc_pt": "preset+gptq_lite",
    "int8": "preset+gptq_lite",
    "int8_wo": "preset+gptq_lite",
    "int4": "preset+gptq_lite",
}
BLOCKED = ("int4", "int4_awq", "w4a8_awq")
# algorithm -> why ModelOpt's megatron HF exporter crashes on it (seen in ModelOpt 0.43 and 0.44)
# what ModelOpt's layer-wise calibration writes into its directory: a manifest, a folder per layer
LAYERWISE_MANIFEST = "manifest.json"
LAYERWISE_FILES = (LAYERWISE_MANIFEST, "layer_")
NO_HF_EXPORT = {"fp8_pc_pt": "it reshapes the fused QKV layer's per-channel weight scales as if they were per block",
                # seen in ModelOpt 0.43 and 0.47 ("Detect pre_quant_scale! SmoothQuant/AWQ are not yet supported")
                "int8_sq": "it rejects SmoothQuant's input pre-quant scales"}

ExportFormat = Literal["hf", "trtllm", "compressed_tensors"]
EXPORT_FORMATS = ("hf", "trtllm", "compressed_tensors")
DTYPE_BITS = {16: torch.float16, "16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
              "float16": torch.float16, "fp16": torch.float16, 32: torch.float32, "float32": torch.float32}


class QuantizationConfigError(InputError):
    """A PTQ/export setting that cannot work, with the fix."""


@dataclasses.dataclass
class QuantizationConfig:
    """What to quantize, how, and on which calibration data (NeMo 2 names)."""

    algorithm: Optional[str] = "fp8"
    """One of ALGORITHMS (fp8, fp8_pc_pt, block_fp8, int8, int8_sq, int8_wo, int4, int4_awq,
    w4a8_awq, nvfp4), or None to export without quantizing."""
    custom_config_path: Optional[str] = None
    """A JSON file with a ModelOpt config ({"quant_cfg": ..., "algorithm": ...}, either form); replaces `algorithm`."""
    calibration_algorithm: Optional[str] = None
    """ModelOpt calibration methods run in order, joined by "+" (e.g. "smoothquant+gptq_lite");
    "preset" is the ModelOpt preset's own method (NeMo 2's behaviour). None: nemo-optim's tuned
    default for `algorithm` (TUNED_CALIBRATION), else "preset"."""
    awq_block_size: int = 128
    """Block size (weights per scale) of int4 / AWQ formats."""
    sq_alpha: Optional[float] = None
    """SmoothQuant migration strength for int8_sq, in [0, 1]. None: ModelOpt's default (1.0), which
    is what NeMo 2 ran: it accepted sq_alpha (default 0.5) but never applied it. On SmolLM2-135M
    alpha 0.5 costs +31% perplexity where 1.0 costs +4%."""
    enable_kv_cache: Optional[bool] = None
    """Quantize the KV cache (None: NeMo 2's default, on for fp8/nvfp4 where the attention supports it)."""
    kv_cache_qformat: Literal["fp8", "nvfp4"] = "fp8"
    exclude_modules: list[str] = dataclasses.field(default_factory=list)
    """Extra wildcard patterns kept unquantized, e.g. ["*layers.0.*"]."""
    exclude_first_layers: int = 0
    """Keep the first N decoder layers unquantized (counted over the whole model, also under PP)."""
    exclude_last_layers: int = 0
    """Keep the last N decoder layers unquantized."""
    calibration_dataset: str = "embedded:pydoc"
    """A DataConfig source: embedded[:part], a .txt / .jsonl file, or hf:<name>."""
    calibration_dataset_size: int = 64
    """Calibration sequences."""
    calibration_batch_size: int = 4
    calibration_seq_len: int = 256
    gptq_hessian_budget: float = 0.1
    """GPTQ-lite keeps an in_features^2 fp32 Hessian per quantized linear until it updates the
    weights (on SmolLM2 ~0.8x the fp32 weights); it runs over as many decoder layers per pass as
    fit this fraction of the model's weight bytes. 0: all layers in one pass (ModelOpt's own)."""
    calibration_checkpoint_dir: Optional[str] = None
    """Calibrate layer by layer (ModelOpt >= 0.46's layer-wise calibration, one process), recording
    each finished decoder layer here: a calibration killed midway (a Slurm time limit) resumes
    after the last finished layer when the stage runs again with the same settings, and ends with
    the same quantized weights. Removed once calibration completes."""
    auto_quantize_bits: Optional[float] = None
    """If set: ModelOpt auto_quantize picks per-layer formats under this effective-bits budget."""
    auto_quantize_formats: list[str] = dataclasses.field(default_factory=lambda: ["fp8", "int4_awq"])

    def __post_init__(self) -> None:
        errors = []
        if self.custom_config_path is None and self.algorithm is not None and self.algorithm not in ALGORITHMS:
            errors.append(f"algorithm={self.algorithm!r} is unknown; choose one of {', '.join(ALGORITHMS)} (or None)")
        unknown_methods = [m for m in (self.calibration_algorithm or "preset").split("+")
                           if m not in CALIBRATION_METHODS]
        if unknown_methods:
            errors.append(f"calibration_algorithm={self.calibration_algorithm!r}: unknown method "
                          f"{unknown_methods[0]!r}; join methods from {', '.join(CALIBRATION_METHODS)} with '+'")
        elif "gptq_lite" in self.calibration_methods():
            methods = self.calibration_methods()
            preset_method = PRESET_METHODS.get(self.algorithm or "", "max")
            before = [preset_method if m == "preset" else m for m in methods[: methods.index("gptq_lite")]]
            clash = [m for m in before if m in NOT_BEFORE_GPTQ]
            if clash:
                errors.append(f"calibration_algorithm={self.calibration_algorithm!r} (algorithm={self.algorithm!r}): "
                              f"ModelOpt's gptq_lite cannot follow {clash[0]}; drop gptq_lite or {clash[0]}")
        if self.awq_block_size < 8 or self.awq_block_size & (self.awq_block_size - 1):
            errors.append(f"awq_block_size={self.awq_block_size} must be a power of two >= 8")
        if self.gptq_hessian_budget < 0:
            errors.append(f"gptq_hessian_budget={self.gptq_hessian_budget} must be >= 0 (0: one pass over all layers)")
        if self.sq_alpha is not None and not 0.0 <= self.sq_alpha <= 1.0:
            errors.append(f"sq_alpha={self.sq_alpha} must be in [0, 1]")
        for name in ("exclude_first_layers", "exclude_last_layers"):
            if getattr(self, name) < 0:
                errors.append(f"{name}={getattr(self, name)} must be >= 0")
        for name in ("calibration_dataset_size", "calibration_batch_size", "calibration_seq_len"):
            if getattr(self, name) < 1:
                errors.append(f"{name}={getattr(self, name)} must be at least 1")
        for fmt in self.auto_quantize_formats if self.auto_quantize_bits is not None else []:
            if fmt not in ALGORITHMS:
                errors.append(f"auto_quantize_formats contains {fmt!r}; choose from {', '.join(ALGORITHMS)}")
        if self.calibration_checkpoint_dir is not None:
            errors += self._layerwise_checkpoint_errors()
        if errors:
            raise QuantizationConfigError("quantization_config: " + "; ".join(errors) + ".")

    def _layerwise_checkpoint_errors(self) -> list[str]:
        setting = f"calibration_checkpoint_dir={self.calibration_checkpoint_dir!r}"
        if self.auto_quantize_bits is not None:
            return [f"{setting} cannot be combined with auto_quantize_bits (its search is not layer-wise)"]
        if len(self.layerwise_methods()) > 1:
            return [f"{setting} needs one calibration method per run, not "
                    f"{self.calibration_algorithm or 'the default'} "
                    f"({'+'.join(self.calibration_methods())}); set calibration_algorithm to one method"]
        return []

    def check_layerwise_checkpoint(self, processes: int) -> None:
        """Where the job runs: ModelOpt's resumable layer-wise calibration exists (>= 0.46) and
        runs in one process."""
        if self.calibration_checkpoint_dir is None:
            return
        setting = f"quantization_config.calibration_checkpoint_dir={self.calibration_checkpoint_dir!r}"
        if not compat.resumable_layerwise_calibration():
            raise QuantizationConfigError(
                f"{setting} needs ModelOpt's resumable layer-wise calibration (nvidia-modelopt >= 0.46, installed "
                f"{compat.installed('nvidia-modelopt')}); unset it or install requirements/current-constraints.txt.")
        if processes > 1:
            raise QuantizationConfigError(
                f"{setting}: ModelOpt's resumable layer-wise calibration runs in one process, this job has "
                f"{processes}; set calibration_tp=1, calibration_pp=1 and devices=1, or unset it.")
        directory = Path(self.calibration_checkpoint_dir)
        others = ([p.name for p in directory.iterdir() if not p.name.startswith(LAYERWISE_FILES)]
                  if directory.is_dir() else [])
        if others:
            raise QuantizationConfigError(
                f"{setting} holds files that are not ModelOpt's layer checkpoints ({others[0]}, ...): it is cleared "
                f"after calibration, so name an empty or new directory.")

    def layerwise_methods(self) -> list[str]:
        """The calibration methods of a layer-wise run: ModelOpt >= 0.44's GPTQ runs max calibration
        itself first, so a "max" step before it is dropped."""
        methods = self.calibration_methods()
        first = PRESET_METHODS.get(self.algorithm or "", "max") if methods[0] == "preset" else methods[0]
        return methods[1:] if methods[1:] == ["gptq_lite"] and first == "max" else methods

    def calibration_methods(self) -> list[str]:
        """The calibration methods in order ("preset" stands for the preset's own)."""
        chosen = self.calibration_algorithm or TUNED_CALIBRATION.get(self.algorithm or "", "preset")
        return chosen.split("+")

    def calibration_data(self) -> DataConfig:
        return DataConfig(source=self.calibration_dataset, seq_length=self.calibration_seq_len)

    def check_hardware(self, cuda_available: bool, lacking: str = "this machine has none") -> None:
        """Formats that need CUDA kernels fail here, before any model is loaded."""
        wanted = set(self.auto_quantize_formats if self.auto_quantize_bits is not None else [self.algorithm])
        if self.enable_kv_cache and self.kv_cache_qformat == "nvfp4":
            wanted.add("nvfp4")
        needs = sorted(wanted & set(NEEDS_CUDA))
        if needs and not cuda_available:
            raise QuantizationConfigError(
                f"quantization_config.algorithm={needs[0]!r} needs a CUDA GPU (NVFP4/MX kernels); "
                f"{lacking}. On CPU use fp8, fp8_pc_pt, int8, int8_sq, int4, int4_awq or w4a8_awq."
            )

    def check_export_format(self, export_format: str) -> None:
        """Export formats known to crash after calibration fail here, before it."""
        if export_format == "compressed_tensors":
            from nemo_optim.quantization.compressed_tensors import check_algorithm

            check_algorithm(self)
            return
        reason = NO_HF_EXPORT.get(self.algorithm or "") if export_format == "hf" else None
        if reason:
            raise QuantizationConfigError(
                f"quantization_config.algorithm={self.algorithm!r} cannot be exported with "
                f"export_config.export_format='hf': "
                f"ModelOpt's megatron HF exporter fails on it ({reason}); use export_format=trtllm."
            )


@dataclasses.dataclass
class ExportConfig:
    """Where and how the quantized model is exported (NeMo 2 names)."""

    path: Optional[str] = None
    """NeMo 2's place for the export's path: the ptq stage's `export_path` is current (this is read as it)."""
    export_format: ExportFormat = "hf"
    """`hf`: ModelOpt's unified HF checkpoint (TensorRT-LLM, vLLM, SGLang); `trtllm`: TensorRT-LLM
    checkpoint; `compressed_tensors`: vLLM's compressed-tensors checkpoint (int8, int8_sq, fp8,
    fp8_pc_pt, int8_wo, int4, int4_awq)."""
    dtype: str = "bf16"
    """dtype of unquantized weights: bf16, fp16 (NeMo 2: 16) or float32."""
    decoder_type: Optional[str] = None
    """TensorRT-LLM decoder type; None infers it from the architecture (llama, qwen)."""
    inference_tp: int = 1
    inference_pp: int = 1
    generate_sample: bool = False
    """Greedy-decode a short prompt with the quantized model after export."""

    def __post_init__(self) -> None:
        errors = []
        if self.export_format not in EXPORT_FORMATS:
            errors.append(f"export_format={self.export_format!r}: choose {', '.join(EXPORT_FORMATS)}")
        if self.dtype not in DTYPE_BITS:
            errors.append(f"dtype={self.dtype!r}: choose bf16, fp16 or float32")
        if self.inference_tp < 1 or self.inference_pp < 1:
            errors.append("inference_tp and inference_pp must be at least 1")
        if self.export_format != "trtllm" and (self.inference_tp, self.inference_pp) != (1, 1):
            errors.append("inference_tp/inference_pp only apply to export_format='trtllm'")
        if errors:
            raise QuantizationConfigError("export_config: " + "; ".join(errors) + ".")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPE_BITS[self.dtype]
