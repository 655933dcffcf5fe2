"""GPU acceptance kit: nemo-optim's GPU paths on one GPU, within 8 minutes, on models built in this process.

Steps:
  1. random Llama models from fixed seeds, written as HF directories with a byte-level BPE tokenizer
     trained on the embedded corpus: SmolLM2-135M's shape and Llama-3.2-1B's (~1.2 B parameters);
     with --tiny, 2-layer models of the same kinds (nothing is downloaded),
  2. every check in CHECKS, each under its own timer and try/except, so one failure hides no other:
     passed, failed (with the error line; its traceback goes to stderr) or skipped (with the reason),
  3. DIR/gpu_acceptance.json (every check, its numbers and the versions) and DIR/gpu_acceptance.md.

Checks (through the project's own stage functions where one exists: ptq, distill, speculative):
  parity_fp32[shape]       megatron-core fp32 logits on the device vs transformers fp32 on the CPU, same weights
  bf16_drift[shape]        the same model in bf16 vs fp32 on the device: KL and top-1 agreement, against
                           transformers' own bf16 drift on the same weights
  ptq[fmt]                 the `ptq` stage (fake-quant calibration, native save, export verified by the stage),
                           then both read back: the native checkpoint's KL to fp32, the export's declared format
                           and stored dtypes; fp8, int8_sq, int4_awq, nvfp4 (CUDA), and fp8_kv_cache (Transformer
                           Engine attention; on megatron's local layers the stage's one-line refusal is the reason)
  kd_step                  the `distill` stage: bf16 autocast on CUDA (fp32 on CPU), tokens/s, peak GPU memory
  eagle3_sdpa_bf16         the `speculative` stage with the 8-GPU recipe's draft settings (sdpa attention, bf16):
                           training, lossless speculative decoding, acceptance length, speed-up vs KV-cached greedy
  eagle3_lossless          the same with the CPU recipes' settings (eager attention, fp32), on any device
  recipes_8gpu_settings    the 8-GPU recipes' TP/PP/DP and batch sizes against Llama-3.1-8B's shape (read from
                           the recipes where nemo_run is installed, else from RECIPES_8GPU, kept equal to them)
  recipes_8gpu_on_one_gpu  what one GPU runs of them at TP=1 on the ~1B shape: a bf16-autocast training step at
                           their sequence length, and the ptq recipe's calibration batch in bf16

    python -m benchmarks.gpu_acceptance --out benchmarks/results              # one GPU (README: GPU acceptance kit)
    python -m benchmarks.gpu_acceptance --device cpu --tiny --out /tmp/ga     # CPU smoke run (the test suite's)

A GPU node gets the libraries beyond torch + transformers from `python -m benchmarks.gpu_wheels`. Exit status 0
when no check failed and the run kept to its time budget, 1 otherwise, 2 when a library every check needs is missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import importlib.util
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

NAME = "gpu_acceptance"
BUDGET_SECONDS = 8 * 60
SEED = 0
NEEDS_CUDA = "needs CUDA"
# a forward of the same weights on two devices, both fp32: only the summation order differs
PARITY_RELATIVE_TOLERANCE = 1e-3  # max |logit difference| / max |logit|
# bf16 against fp32 (the weights are bf16 values on both sides: only the arithmetic differs), next to transformers'
# own bf16 drift on the same weights (SmolLM2's shape on CPU: KL 1.8e-5 here, 1.9e-5 there)
BF16_KL_VS_TRANSFORMERS = 3.0
BF16_MAX_KL = 0.01  # nats per token, whatever transformers' drift
# fake-quant against fp32 on random weights (near-flat distributions: a broken quantizer gives KL >> 1)
PTQ_MAX_KL = {"fp8": 0.05, "int8_sq": 0.1, "int4_awq": 0.5, "nvfp4": 0.5}
# storage dtypes (safetensors) an export of each format must hold: packed INT4 is stored in int8 or uint8
PTQ_EXPORT_DTYPES = {"fp8": {"F8_E4M3"}, "int8_sq": {"I8"}, "int4_awq": {"I8", "U8"}, "nvfp4": {"U8"}}
# ModelOpt's megatron HF exporter writes FP8 / NVFP4 only (nemo_optim.quantization.config.NO_HF_EXPORT)
PTQ_EXPORT_FORMATS = {"fp8": "hf", "int8_sq": "trtllm", "int4_awq": "trtllm", "nvfp4": "hf"}


class CheckFailed(RuntimeError):
    """A check ran and its result is wrong; `details` keeps what it measured."""

    def __init__(self, message: str, details: dict | None = None):
        super().__init__(message)
        self.details = details or {}


class Skipped(Exception):
    """A check that cannot run here; the message is the one-line reason."""


@dataclasses.dataclass(frozen=True)
class Shape:
    """A Llama-style decoder, built with random weights (`transformers.LlamaConfig` fields)."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    rope_theta: float
    rope_scaling_factor: float | None = None
    """Llama-3 style RoPE scaling (low 1, high 4, original 8192: what nemo-optim imports)."""
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = True


# name, hidden, MLP, layers, heads, KV heads, vocabulary, RoPE theta (their config.json's values)
SHAPES = {
    "smollm2-135m": Shape("smollm2-135m", 576, 1536, 30, 9, 3, 49152, 100000.0),  # 135 M parameters
    "llama-1b": Shape("llama-1b", 2048, 8192, 16, 32, 8, 128256, 500000.0,  # Llama-3.2-1B: 1.24 B parameters
                      rope_scaling_factor=32.0, max_position_embeddings=131072),
}
TINY_SHAPES = {
    "smollm2-135m": Shape("smollm2-135m (tiny)", 64, 128, 2, 4, 2, 512, 100000.0),
    "llama-1b": Shape("llama-1b (tiny)", 96, 192, 2, 6, 2, 768, 500000.0, rope_scaling_factor=32.0,
                      max_position_embeddings=131072),
}
TOKENIZER_VOCAB = 512  # (the models' vocabularies are larger: ids the tokenizer never makes stay unused)


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How much work each check does."""

    eval_rows: int
    eval_seq: int
    calibration_rows: int
    calibration_seq: int
    kd_steps: int
    kd_micro_batch: int
    kd_global_batch: int
    kd_seq: int
    kd_student_layers: int
    draft_steps: int
    draft_prompts: int
    draft_seq: int
    prompt_tokens: int
    eval_prompts: int
    new_tokens: int
    draft_lengths: tuple[int, ...]


FULL = Sizes(eval_rows=2, eval_seq=256, calibration_rows=32, calibration_seq=256, kd_steps=6, kd_micro_batch=4,
             kd_global_batch=8, kd_seq=512, kd_student_layers=20, draft_steps=60, draft_prompts=64, draft_seq=256,
             prompt_tokens=32, eval_prompts=4, new_tokens=96, draft_lengths=(1, 3))
TINY = Sizes(eval_rows=2, eval_seq=32, calibration_rows=8, calibration_seq=64, kd_steps=3, kd_micro_batch=2,
             kd_global_batch=4, kd_seq=64, kd_student_layers=1, draft_steps=6, draft_prompts=16, draft_seq=64,
             prompt_tokens=16, eval_prompts=2, new_tokens=24, draft_lengths=(1, 3))

# Llama-3.1-8B, the 8-GPU recipes' model (its config.json), and the 4B width-pruned student's targets
LLAMA31_8B = {"hidden_size": 4096, "ffn_hidden_size": 14336, "num_attention_heads": 32, "num_query_groups": 8,
              "vocab_size": 128256}
RECIPES_WITH_4B = ("llama31_8b_distill_4b_8gpu_h100_bf16", "llama31_8b_prune_width4b_8gpu_h100_bf16")

# The settings of the 8-GPU recipes that decide what one GPU does (parallel layout, per-GPU batch, numerics). On
# a GPU node without nemo_run the kit uses these; `recipes_8gpu_settings` fails wherever nemo_run is installed
# (the CPU suite) when a recipe no longer has them, so they cannot drift from the recipes.
RECIPES_8GPU: dict[str, dict[str, Any]] = {
    "llama31_8b_distill_4b_8gpu_h100_bf16": {
        "devices": 8, "num_nodes": 1, "tp_size": 8, "pp_size": 1, "data.seq_length": 4096,
        "training.micro_batch_size": 4, "training.global_batch_size": 768, "training.precision": "bf16"},
    "llama31_8b_finetune_teacher_8gpu_h100_bf16": {
        "devices": 8, "num_nodes": 1, "tp_size": 8, "pp_size": 1, "data.seq_length": 4096,
        "training.micro_batch_size": 4, "training.global_batch_size": 128, "training.precision": "bf16"},
    "llama31_8b_prune_width4b_8gpu_h100_bf16": {
        "devices": 8, "tp_size": 8, "pp_size": 1, "data.seq_length": 4096,
        "pruning_config.target_hidden_size": 3072, "pruning_config.target_ffn_hidden_size": 9216},
    "llama31_8b_ptq_fp8_8gpu_h100_bf16": {
        "calibration_tp": 8, "calibration_pp": 1, "model_dtype": "bfloat16", "transformer_impl": "modelopt",
        "quantization_config.algorithm": "fp8", "quantization_config.enable_kv_cache": None,
        "quantization_config.calibration_batch_size": 4, "quantization_config.calibration_seq_len": 4096},
    "llama31_8b_speculative_eagle3_8gpu_h100_bf16": {
        "devices": 8, "num_nodes": 1, "data.seq_length": 2048, "training.micro_batch_size": 2,
        "training.global_batch_size": 16, "training.precision": "bf16", "dtype": "bfloat16",
        "speculative_config.attention_impl": "sdpa"},
}


# --- the models ------------------------------------------------------------------------------------

class Kit:
    """What the checks share: the device, the sizes, the work directory, and the models and tokenizer
    built on first use (each once)."""

    def __init__(self, device: str, tiny: bool, work: Path):
        self.device, self.tiny, self.work = device, tiny, work
        self.shapes = TINY_SHAPES if tiny else SHAPES
        self.sizes = TINY if tiny else FULL
        self._tokenizer = None
        self._models: dict[tuple, Path] = {}

    @property
    def tokenizer_dir(self) -> Path:
        if self._tokenizer is None:
            self._tokenizer = train_tokenizer(self.work / "tokenizer")
        return self._tokenizer

    def model(self, shape: str, seed: int = SEED, num_layers: int | None = None) -> Path:
        """HF directory of a random model of `shape` (optionally only `num_layers` deep)."""
        key = (shape, seed, num_layers)
        if key not in self._models:
            spec = self.shapes[shape]
            if num_layers is not None:
                spec = dataclasses.replace(spec, num_hidden_layers=num_layers)
            directory = self.work / "models" / f"{shape}-seed{seed}-{spec.num_hidden_layers}layers"
            self._models[key] = write_random_model(spec, directory, self.tokenizer_dir, seed, self.device)
        return self._models[key]

    def tokens(self, rows: int, seq: int, split: str = "validation"):
        """`[rows, seq + 1]` held-out token rows of the embedded corpus."""
        from nemo_optim.data.corpus import DataConfig
        from nemo_optim.data.packing import packed_sequences
        from nemo_optim.models.loader import load_tokenizer

        return packed_sequences(DataConfig(seq_length=seq), split, load_tokenizer(self.tokenizer_dir), rows)


def train_tokenizer(directory: Path) -> Path:
    """A byte-level BPE tokenizer trained on the embedded corpus (no download), saved to `directory`."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from nemo_optim.data.corpus import DataConfig, load_documents

    eos = "<|endoftext|>"
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOKENIZER_VOCAB, special_tokens=[eos],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(load_documents(DataConfig(source="embedded:pydoc")), trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eos, pad_token=eos)
    fast.save_pretrained(directory)
    return directory


def llama_config(shape: Shape, eos_id: int):
    import transformers

    rope = {"rope_theta": shape.rope_theta}
    if shape.rope_scaling_factor is not None:
        rope["rope_scaling"] = {"rope_type": "llama3", "factor": shape.rope_scaling_factor, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    return transformers.LlamaConfig(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size, intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers, num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads, max_position_embeddings=shape.max_position_embeddings,
        rms_norm_eps=1e-5, tie_word_embeddings=shape.tie_word_embeddings, eos_token_id=eos_id, bos_token_id=eos_id,
        **rope)


def write_random_model(shape: Shape, directory: Path, tokenizer_dir: Path, seed: int, device: str) -> Path:
    """A `LlamaForCausalLM` of `shape` initialised on `device` from `seed` (norm weights perturbed, so a
    converter that drops them shows), saved in bf16 with the tokenizer: the weights are bf16 values for
    every later check, so fp32 and bf16 runs differ only in their arithmetic."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(llama_config(shape, tokenizer.eos_token_id))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    model.to(device="cpu", dtype=torch.bfloat16).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    del model
    return directory


# --- measurements ----------------------------------------------------------------------------------

def distribution_gap(logits, reference) -> dict[str, float]:
    """Mean per-token KL(reference || logits) and top-1 agreement of two `[B, S, V]` logits."""
    import torch.nn.functional as F

    logits, reference = logits.float().cpu(), reference.float().cpu()
    kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(reference, -1), log_target=True, reduction="sum")
    positions = logits.shape[0] * logits.shape[1]
    top1 = (logits.argmax(-1) == reference.argmax(-1)).float().mean()
    return {"kl": kl.item() / positions, "top1_agreement": top1.item()}


def hf_logits(hf_dir: Path, tokens, dtype_name: str = "float32", device: str = "cpu"):
    """transformers' logits `[B, S, V]` of `[B, S+1]` token rows (the oracle side)."""
    import torch
    import transformers

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype).to(device).eval()
    with torch.no_grad():
        logits = model(tokens[:, :-1].to(device)).logits.float().cpu()
    del model
    return logits


def megatron_logits(hf_dir: Path, tokens, dtype: str = "float32", transformer_impl: str | None = None):
    """nemo-optim's megatron-core model of `hf_dir` on this process's device: its logits, on the CPU."""
    from nemo_optim import runtime
    from nemo_optim.models.forward import forward_logits
    from nemo_optim.models.loader import load_model

    with runtime.parallel_runtime():
        model = load_model(hf_dir, dtype=dtype, transformer_impl=transformer_impl).model
        logits = forward_logits(model, tokens).cpu()
        del model
    return logits


def safetensors_dtypes(directory: Path) -> dict[str, int]:
    """Storage dtype -> number of tensors, over every safetensors file of an export."""
    from safetensors import safe_open

    counts: dict[str, int] = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                dtype = handle.get_slice(key).get_dtype()
                counts[dtype] = counts.get(dtype, 0) + 1
    return counts


def directory_mib(directory: Path) -> float:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()) / 2**20


def device_name() -> str:
    import torch

    return f"{torch.cuda.get_device_name()} (cuda)" if torch.cuda.is_available() else "the CPU"


def reset_peak_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_gib() -> float | None:
    """Peak GPU memory allocated by torch since `reset_peak_memory` (None without CUDA)."""
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def _median_step_seconds(history: list[dict]) -> float:
    """Median wall time of the logged training steps after the first (which pays warm-up)."""
    steps = [row["seconds_per_step"] for row in history if row["kind"] == "train"]
    return statistics.median(steps[1:] or steps)


def _tf32_matmul() -> bool:
    import torch

    return bool(torch.backends.cuda.matmul.allow_tf32)


def _require_finite(values: list[float], what: str) -> None:
    if not values or not all(math.isfinite(v) for v in values):
        raise CheckFailed(f"{what} not finite: {values}")


# --- the checks: each takes the Kit and returns its numbers (with a one-line "summary") -------------

def check_parity(kit: Kit, shape: str) -> dict:
    """nemo-optim's megatron model in fp32 on the device against transformers in fp32 on the CPU."""
    hf_dir = kit.model(shape)
    tokens = kit.tokens(kit.sizes.eval_rows, kit.sizes.eval_seq)
    reference = hf_logits(hf_dir, tokens)  # transformers, fp32, CPU: the oracle
    ours = megatron_logits(hf_dir, tokens)  # nemo-optim, fp32, the device
    difference, scale = (ours - reference).abs().max().item(), reference.abs().max().item()
    gap = distribution_gap(ours, reference)
    details = {"shape": kit.shapes[shape].name, "device": kit.device, "max_abs_diff": difference,
               "max_abs_logit": scale, **gap,
               "summary": f"megatron {kit.device} fp32 vs transformers CPU fp32: max abs diff {difference:.2e} "
                          f"({difference / scale:.1e} of max abs logit), top-1 {gap['top1_agreement']:.1%}"}
    if kit.device == "cuda":  # (TF32 matmuls, if something turned them on, would show here as a larger difference)
        details["tf32_matmul"] = _tf32_matmul()
    else:
        details["gpu_vs_cpu"] = "not measured: this run has no CUDA device (both sides ran on the CPU)"
    if not difference <= PARITY_RELATIVE_TOLERANCE * scale:
        raise CheckFailed(f"max |logit difference| {difference:.3g} exceeds {PARITY_RELATIVE_TOLERANCE} x max |logit| "
                          f"{scale:.3g}", details)
    return details


def check_bf16_drift(kit: Kit, shape: str) -> dict:
    """The megatron model in bf16 against itself in fp32 on the device; transformers' drift beside it."""
    hf_dir = kit.model(shape)
    tokens = kit.tokens(kit.sizes.eval_rows, kit.sizes.eval_seq)
    ours = distribution_gap(megatron_logits(hf_dir, tokens, dtype="bfloat16"), megatron_logits(hf_dir, tokens))
    theirs = distribution_gap(hf_logits(hf_dir, tokens, "bfloat16", kit.device),
                              hf_logits(hf_dir, tokens, "float32", kit.device))
    details = {"shape": kit.shapes[shape].name, "device": kit.device, **ours,
               "transformers_kl": theirs["kl"], "transformers_top1_agreement": theirs["top1_agreement"],
               "summary": f"bf16 vs fp32 on {kit.device}: KL {ours['kl']:.2e}, top-1 {ours['top1_agreement']:.1%} "
                          f"(transformers: KL {theirs['kl']:.2e}, top-1 {theirs['top1_agreement']:.1%})"}
    limit = min(BF16_MAX_KL, BF16_KL_VS_TRANSFORMERS * theirs["kl"] + 1e-6)
    if not ours["kl"] <= limit:
        raise CheckFailed(f"bf16 drift KL {ours['kl']:.3g} exceeds {limit:.3g} ({BF16_KL_VS_TRANSFORMERS} x "
                          f"transformers' own bf16 drift {theirs['kl']:.3g} on the same weights, at most "
                          f"{BF16_MAX_KL})", details)
    return details


def _ptq_config(kit: Kit, algorithm: str, **changes):
    from nemo_optim.quantization.config import QuantizationConfig

    # awq_block_size 64 divides every linear input of both SmolLM2 shapes (576, 1536; tiny 64, 128)
    return QuantizationConfig(algorithm=algorithm, awq_block_size=64, calibration_batch_size=4,
                              calibration_dataset_size=kit.sizes.calibration_rows,
                              calibration_seq_len=kit.sizes.calibration_seq, **changes)


def _calibration_dtype(kit: Kit) -> str:
    return "bfloat16" if kit.device == "cuda" else "float32"  # what the GPU recipes calibrate in; fp32 on CPU


def read_back_native(kit: Kit, native: Path, hf_dir: Path) -> dict:
    """The quantized native checkpoint, loaded again: its quantizers are back, and its KL to the fp32 model."""
    from nemo_optim import runtime
    from nemo_optim.evaluation import evaluate_model
    from nemo_optim.models.loader import load_model
    from nemo_optim.quantization.quantizer import is_quantized

    tokens = kit.tokens(kit.sizes.eval_rows, kit.sizes.eval_seq)
    with runtime.parallel_runtime():
        quantized = load_model(native).model
        if not is_quantized(quantized):
            raise CheckFailed(f"{native}: no enabled quantizer after loading the quantized native checkpoint again")
        result = evaluate_model(quantized, tokens, reference=load_model(hf_dir).model)
    return {"kl": result.kl_to_reference, "top1_agreement": result.top1_agreement}


def read_back_export(path: Path, export_format: str, config) -> dict:
    """The export's files, read again: the format they declare (the stage's own verification, repeated on
    disk) and the storage dtypes of their tensors."""
    from nemo_optim.quantization.quantizer import declared_quant_algo, expected_export_algos, verify_export

    verify_export(path, export_format, expected_export_algos(config))
    return {"declared": declared_quant_algo(path, export_format), "dtypes": safetensors_dtypes(path),
            "export_mib": round(directory_mib(path), 2)}


def check_ptq(kit: Kit, algorithm: str) -> dict:
    """The `ptq` stage on the SmolLM2-shaped model, then its native checkpoint and export read back."""
    from nemo_optim import runtime
    from nemo_optim.quantization.config import ExportConfig, QuantizationConfigError
    from nemo_optim.stages.ptq import ptq

    config = _ptq_config(kit, algorithm)
    try:
        config.check_hardware(runtime.use_cuda())  # the stage's own refusal, before any model is built
    except QuantizationConfigError as error:
        raise Skipped(str(error)) from None
    hf_dir = kit.model("smollm2-135m")
    export = ExportConfig(path=str(kit.work / f"ptq_{algorithm}"), export_format=PTQ_EXPORT_FORMATS[algorithm])
    began = time.perf_counter()
    ptq(model_path=str(hf_dir), export_config=export, quantization_config=config, model_dtype=_calibration_dtype(kit),
        overwrite=True)
    details = {"stage_seconds": round(time.perf_counter() - began, 2), "export_format": export.export_format,
               "calibration_dtype": _calibration_dtype(kit),
               **read_back_native(kit, Path(f"{export.path}_native"), hf_dir),
               **read_back_export(Path(export.path), export.export_format, config)}
    details["summary"] = (f"{details['declared']} {export.export_format} export ({details['export_mib']:.1f} MiB, "
                          f"{_dtype_text(details['dtypes'])}); fake-quant KL {details['kl']:.2e}, "
                          f"top-1 {details['top1_agreement']:.1%}")
    low_bit = PTQ_EXPORT_DTYPES[algorithm] & set(details["dtypes"])
    if not low_bit:
        raise CheckFailed(f"the {algorithm} export holds no {'/'.join(sorted(PTQ_EXPORT_DTYPES[algorithm]))} tensor "
                          f"({details['dtypes']})", details)
    if not details["kl"] <= PTQ_MAX_KL[algorithm]:
        raise CheckFailed(f"fake-quant KL to fp32 {details['kl']:.3g} exceeds {PTQ_MAX_KL[algorithm]}", details)
    return details


def _dtype_text(dtypes: dict[str, int]) -> str:
    return ", ".join(f"{count} {dtype}" for dtype, count in sorted(dtypes.items()))


def check_fp8_kv_cache(kit: Kit) -> dict:
    """FP8 PTQ with the FP8 KV cache: on Transformer Engine attention (transformer_impl=modelopt, CUDA) it
    must export `kv_cache_quant_algo: FP8`; on megatron's local layers the stage refuses it in one line."""
    from nemo_optim import runtime
    from nemo_optim.quantization.config import ExportConfig, QuantizationConfigError
    from nemo_optim.stages.ptq import ptq

    has_te = importlib.util.find_spec("transformer_engine") is not None
    transformer_impl = "modelopt" if has_te and runtime.use_cuda() else None
    export = ExportConfig(path=str(kit.work / "ptq_fp8_kv_cache"))
    config = _ptq_config(kit, "fp8", enable_kv_cache=True, calibration_algorithm="preset")
    try:
        ptq(model_path=str(kit.model("smollm2-135m")), export_config=export, quantization_config=config,
            model_dtype=_calibration_dtype(kit), transformer_impl=transformer_impl, overwrite=True)
    except QuantizationConfigError as error:
        if transformer_impl is not None:
            raise
        where = "not installed" if not has_te else "installed, but this run has no CUDA"
        raise Skipped(f"{error} (Transformer Engine: {where})") from None
    quantization = json.loads((Path(export.path) / "hf_quant_config.json").read_text())["quantization"]
    details = {"transformer_impl": transformer_impl, "quant_algo": quantization.get("quant_algo"),
               "kv_cache_quant_algo": quantization.get("kv_cache_quant_algo")}
    details["summary"] = f"{details['quant_algo']} weights, KV cache {details['kv_cache_quant_algo']}"
    if details["kv_cache_quant_algo"] != "FP8":
        raise CheckFailed(f"the export declares kv_cache_quant_algo={details['kv_cache_quant_algo']!r}, not FP8",
                          details)
    return details


def check_kd_step(kit: Kit) -> dict:
    """The `distill` stage: the SmolLM2-shaped teacher into a shallower student, bf16 autocast on CUDA."""
    from nemo_optim import runtime
    from nemo_optim.data.corpus import DataConfig
    from nemo_optim.stages.distill import distill
    from nemo_optim.training import TrainingConfig

    sizes = kit.sizes
    precision = "bf16" if runtime.use_cuda() else "fp32"  # (bf16 autocast needs CUDA)
    training = TrainingConfig(max_steps=sizes.kd_steps, global_batch_size=sizes.kd_global_batch,
                              micro_batch_size=sizes.kd_micro_batch, lr=1e-4, warmup_steps=0, log_interval=1,
                              val_check_interval=0, num_val_sequences=sizes.kd_micro_batch, checkpoint_interval=0,
                              precision=precision)
    student = kit.model("smollm2-135m", seed=1, num_layers=sizes.kd_student_layers)
    result = distill(model_path=str(student), teacher_model_path=str(kit.model("smollm2-135m")),
                     output_path=str(kit.work / "kd_student"), data=DataConfig(seq_length=sizes.kd_seq),
                     training=training, resume=False, overwrite=True)
    losses = [row["loss"] for row in result.history if row["kind"] == "train"]
    _require_finite(losses, "KD losses")
    seconds = _median_step_seconds(result.history)
    tokens = sizes.kd_global_batch * sizes.kd_seq
    details = {"precision": precision, "steps": len(losses), "tokens_per_step": tokens, "seconds_per_step": seconds,
               "tokens_per_second": tokens / seconds, "losses": losses,
               "student_layers": sizes.kd_student_layers,
               "teacher_layers": kit.shapes["smollm2-135m"].num_hidden_layers}
    details["summary"] = (f"{precision}: {details['tokens_per_second']:.0f} tokens/s ({tokens} tokens/step, "
                          f"{seconds:.3f} s), loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    return details


SDPA_NEEDS_CUDA = (f"{NEEDS_CUDA}: the 8-GPU recipe's draft settings, bf16 autocast and sdpa attention (ModelOpt "
                   f"0.43's training-time-test attention asks for cuDNN SDPA); the CPU recipes' eager attention runs "
                   f"in eagle3_lossless")


def check_eagle3(kit: Kit, attention: str, dtype: str, precision: str) -> dict:
    """The `speculative` stage: an EAGLE-3 draft on the SmolLM2-shaped model trained on its own greedy
    continuations, then speculative vs KV-cached greedy decoding of held-out prompts, saved and exported."""
    from nemo_optim.data.corpus import DataConfig
    from nemo_optim.speculative.config import SpeculativeConfig
    from nemo_optim.speculative.data import SelfDistillationConfig
    from nemo_optim.speculative.measure import SpeculativeEvaluationConfig
    from nemo_optim.stages.speculative import speculative
    from nemo_optim.training import TrainingConfig

    sizes = kit.sizes
    output = kit.work / f"eagle3_{attention}"
    result = speculative(
        model_path=str(kit.model("smollm2-135m")), output_path=str(output), export_path=f"{output}_export",
        speculative_config=SpeculativeConfig(algorithm="eagle3", num_draft_tokens=max(sizes.draft_lengths),
                                             attention_impl=attention),
        data=DataConfig(seq_length=sizes.draft_seq),
        self_distillation=SelfDistillationConfig(num_prompts=sizes.draft_prompts, prompt_tokens=sizes.prompt_tokens,
                                                 continuation_tokens=sizes.draft_seq),
        training=TrainingConfig(max_steps=sizes.draft_steps, global_batch_size=8, micro_batch_size=4, lr=3e-3,
                                warmup_steps=2, log_interval=1, val_check_interval=0, num_val_sequences=4,
                                checkpoint_interval=0, precision=precision),
        evaluation=SpeculativeEvaluationConfig(num_prompts=sizes.eval_prompts, prompt_tokens=sizes.prompt_tokens,
                                               max_new_tokens=sizes.new_tokens,
                                               draft_lengths=list(sizes.draft_lengths)),
        dtype=dtype, resume=False, overwrite=True)
    losses = [row["loss"] for row in result.training.history if row["kind"] == "train"]
    _require_finite(losses, "draft losses")
    rows = result.evaluation["results"]
    details = {"attention_impl": attention, "dtype": dtype, "precision": precision, "losses": [losses[0], losses[-1]],
               "seconds_per_step": _median_step_seconds(result.training.history),
               "lossless": result.evaluation["lossless"], "results": rows}
    details["summary"] = f"{attention} {dtype}: loss {losses[0]:.2f} -> {losses[-1]:.2f}; " + "; ".join(
        f"k={r['draft_length']}: acceptance {r['acceptance_length']:.2f}, {r['speedup']:.2f}x greedy, "
        f"identical {r['identical_prompts']}/{r['num_prompts']}" for r in rows)
    if not result.evaluation["lossless"]:
        raise CheckFailed("speculative decoding differs from plain greedy decoding: "
                          + ", ".join(f"k={r['draft_length']}: {r['identical_prompts']}/{r['num_prompts']} identical"
                                      for r in rows), details)
    return details


# --- the 8-GPU recipes -----------------------------------------------------------------------------

_MISSING = "<missing>"


def _setting(value: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        value = value.get(part, _MISSING) if isinstance(value, dict) else getattr(value, part, _MISSING)
        if value is _MISSING:
            return _MISSING
    return value


def recipes_as_written() -> dict[str, dict[str, Any]] | None:
    """The RECIPES_8GPU settings as the registered 8-GPU recipes have them (recipe factories are pure:
    built with fiddle, nothing runs); None without nemo_run (a GPU node need not have it)."""
    if importlib.util.find_spec("nemo_run") is None:
        return None
    import fiddle as fdl

    from nemo_optim_recipes import llm

    found = {}
    for name, factory in sorted(llm.RECIPES.items()):
        if "_8gpu" in name:
            built = fdl.build(factory())
            found[name] = {key: _setting(built.keywords, key) for key in RECIPES_8GPU.get(name, {})}
    return found


def recipe_drift(written: dict[str, dict[str, Any]]) -> list[str]:
    problems = [f"{name}: not in RECIPES_8GPU; add its settings" for name in sorted(set(written) - set(RECIPES_8GPU))]
    problems += [f"{name}: no such recipe any more; remove it from RECIPES_8GPU"
                 for name in sorted(set(RECIPES_8GPU) - set(written))]
    for name in sorted(set(written) & set(RECIPES_8GPU)):
        problems += [f"{name}: {key}={written[name][key]!r}, RECIPES_8GPU has {value!r}"
                     for key, value in RECIPES_8GPU[name].items() if written[name][key] != value]
    return problems


def _llama31_shapes(recipe: str) -> dict[str, dict[str, int]]:
    """The models a recipe holds: Llama-3.1-8B, and the width-pruned 4B student where it makes or trains it."""
    prune = RECIPES_8GPU["llama31_8b_prune_width4b_8gpu_h100_bf16"]
    pruned = {**LLAMA31_8B, "hidden_size": prune["pruning_config.target_hidden_size"],
              "ffn_hidden_size": prune["pruning_config.target_ffn_hidden_size"]}
    return {"llama31_8b": LLAMA31_8B, **({"llama31_4b": pruned} if recipe in RECIPES_WITH_4B else {})}


def layout_problems(name: str, settings: dict[str, Any]) -> list[str]:
    """What the recipe's TP / PP / processes / batch sizes cannot do with its models: megatron's own
    TransformerConfig checks (heads and query groups per TP rank), the vocabulary and MLP split per TP rank,
    and the global batch per data-parallel replica (TrainingConfig's own rule)."""
    from nemo_optim import runtime
    from nemo_optim.models.config import GPTModelConfig, transformer_config
    from nemo_optim.training import TrainingConfig, TrainingConfigError

    tp = settings.get("tp_size", settings.get("calibration_tp", 1))
    pp = settings.get("pp_size", settings.get("calibration_pp", 1))
    processes = (settings.get("devices") or tp * pp) * (settings.get("num_nodes") or 1)
    problems = []
    if processes % (tp * pp):
        problems.append(f"{name}: {processes} processes is not a multiple of TP x PP = {tp * pp}")
    for model, shape in _llama31_shapes(name).items():
        config = GPTModelConfig(num_layers=32, **shape)
        try:
            transformer_config(config, runtime.ParallelConfig(tensor_model_parallel_size=tp,
                                                              pipeline_model_parallel_size=pp))
        except (AssertionError, ValueError) as error:
            problems.append(f"{name}: {model} at TP={tp}: {error}")
        problems += [f"{name}: {model} {field}={shape[field]} is not divisible by TP={tp}"
                     for field in ("vocab_size", "ffn_hidden_size") if shape[field] % tp]
    if "training.global_batch_size" in settings:
        training = TrainingConfig(global_batch_size=settings["training.global_batch_size"],
                                  micro_batch_size=settings["training.micro_batch_size"])
        try:
            training.micro_batches_per_step(processes // (tp * pp))
        except TrainingConfigError as error:
            problems.append(f"{name}: {error}")
    return problems


def check_recipe_settings(kit: Kit) -> dict:
    """The 8-GPU recipes' parallel layouts and batch sizes against Llama-3.1-8B's shape (and the 4B
    student's); where nemo_run is installed, RECIPES_8GPU against the recipes themselves."""
    written = recipes_as_written()
    problems = recipe_drift(written) if written is not None else []
    for name, settings in RECIPES_8GPU.items():
        problems += layout_problems(name, settings)
    source = "read from the recipes" if written is not None else (
        "RECIPES_8GPU (nemo_run is not installed here; the CPU suite checks them against the recipes)")
    details = {"recipes": sorted(RECIPES_8GPU), "source": source, "problems": problems,
               "summary": f"{len(RECIPES_8GPU)} recipes, settings {source}: "
                          + ("; ".join(problems) if problems else "layouts and batch sizes fit")}
    if problems:
        raise CheckFailed("; ".join(problems), details)
    return details


def _one_gpu_training_step(kit: Kit, hf_dir: Path, seq_length: int, precision: str) -> dict:
    """A training step of the ~1B model at TP=1 on one `seq_length` sequence (megatron's schedule, the
    finetune loss), as the recipes train: fp32 weights, `precision` autocast."""
    from nemo_optim import runtime
    from nemo_optim.models.loader import load_model
    from nemo_optim.training import TrainingConfig, lm_loss_reduction, train

    rows = kit.tokens(2, seq_length, split="train")
    training = TrainingConfig(max_steps=3, global_batch_size=1, micro_batch_size=1, warmup_steps=0, log_interval=1,
                              val_check_interval=0, checkpoint_interval=0, precision=precision)
    reset_peak_memory()
    with runtime.parallel_runtime():
        result = train(load_model(hf_dir).model, rows, None, lm_loss_reduction, training, kit.work / "recipe_step_run")
    losses = [row["loss"] for row in result.history if row["kind"] == "train"]
    _require_finite(losses, "training losses")
    seconds = _median_step_seconds(result.history)
    return {"seq_length": seq_length, "precision": precision, "seconds_per_step": seconds,
            "tokens_per_second": seq_length / seconds, "losses": losses,
            "peak_gpu_memory_gib": peak_memory_gib()}


def _one_gpu_calibration_forward(kit: Kit, hf_dir: Path, settings: dict[str, Any]) -> dict:
    """The ptq recipe's calibration batch (its batch size x sequence length) through the ~1B model in its
    calibration dtype at TP=1, on its layer spec where Transformer Engine is installed."""
    import torch

    from nemo_optim import runtime
    from nemo_optim.models.forward import forward_only
    from nemo_optim.models.loader import load_model

    wanted = settings["transformer_impl"]
    has_te = importlib.util.find_spec("transformer_engine") is not None
    transformer_impl = wanted if has_te else "local"
    rows = kit.tokens(settings["quantization_config.calibration_batch_size"],
                      settings["quantization_config.calibration_seq_len"], split="calibration")
    reset_peak_memory()
    with runtime.parallel_runtime():
        model = load_model(hf_dir, dtype=settings["model_dtype"], transformer_impl=transformer_impl).model
        began = time.perf_counter()
        forward_only(model, rows)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - began
    return {"rows": list(rows.shape), "dtype": settings["model_dtype"], "transformer_impl": transformer_impl,
            "note": None if has_te else f"transformer_impl={wanted} needs Transformer Engine, not installed: ran local",
            "seconds": seconds, "peak_gpu_memory_gib": peak_memory_gib()}


def check_recipes_on_one_gpu(kit: Kit) -> dict:
    """What one GPU can run of the 8-GPU recipes at TP=1, on the ~1B shape: a training step at the megatron
    training recipes' sequence length and precision (one sequence: the recipes' micro-batch of 4 is spread
    over 8 GPUs at TP=8), and the ptq recipe's calibration batch in its dtype (sdpa: eagle3_sdpa_bf16)."""
    hf_dir = kit.model("llama-1b")
    trainings = sorted({(s["data.seq_length"], s["training.precision"]) for s in RECIPES_8GPU.values()
                        if "tp_size" in s and "training.precision" in s})
    steps = [_one_gpu_training_step(kit, hf_dir, seq, precision) for seq, precision in trainings]
    calibration = _one_gpu_calibration_forward(kit, hf_dir, RECIPES_8GPU["llama31_8b_ptq_fp8_8gpu_h100_bf16"])
    details = {"shape": kit.shapes["llama-1b"].name, "training_steps": steps, "calibration_forward": calibration}
    details["summary"] = "; ".join(
        [f"train 1 x {s['seq_length']} {s['precision']}: {s['tokens_per_second']:.0f} tokens/s, "
         f"{s['peak_gpu_memory_gib']} GiB" for s in steps]
        + [f"calibration {calibration['rows'][0]} x {calibration['rows'][1] - 1} {calibration['dtype']} "
           f"({calibration['transformer_impl']}): {calibration['seconds']:.2f} s, "
           f"{calibration['peak_gpu_memory_gib']} GiB"
           + (f" ({calibration['note']})" if calibration["note"] else "")])
    return details


# --- running them ----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Check:
    name: str
    run: Callable[[Kit], dict]
    needs_cuda: str | None = None
    """Why it is not run at all without CUDA (None: it runs, and may skip itself with the library's reason)."""
    on_cpu: str = "passed"
    """Its status in a run without CUDA (what the CPU suite asserts)."""


CHECKS: list[Check] = (
    [Check(f"parity_fp32[{shape}]", functools.partial(check_parity, shape=shape)) for shape in SHAPES]
    + [Check(f"bf16_drift[{shape}]", functools.partial(check_bf16_drift, shape=shape)) for shape in SHAPES]
    + [Check(f"ptq[{algorithm}]", functools.partial(check_ptq, algorithm=algorithm),
             on_cpu="skipped" if algorithm == "nvfp4" else "passed") for algorithm in PTQ_EXPORT_FORMATS]
    + [Check("ptq[fp8_kv_cache]", check_fp8_kv_cache, on_cpu="skipped"),
       Check("kd_step", check_kd_step),
       Check("eagle3_sdpa_bf16", functools.partial(check_eagle3, attention="sdpa", dtype="bfloat16", precision="bf16"),
             needs_cuda=SDPA_NEEDS_CUDA, on_cpu="skipped"),
       Check("eagle3_lossless", functools.partial(check_eagle3, attention="eager", dtype="float32", precision="fp32")),
       Check("recipes_8gpu_settings", check_recipe_settings),
       Check("recipes_8gpu_on_one_gpu", check_recipes_on_one_gpu, on_cpu="skipped",
             needs_cuda=f"{NEEDS_CUDA}: a bf16-autocast training step and a bf16 calibration forward on one GPU")]
)


def error_line(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:500]


def _settle() -> None:
    """Leaves no parallel state or cached device memory behind for the next check (a failed stage may)."""
    import torch
    import torch.distributed as dist

    from nemo_optim import runtime

    if dist.is_initialized():
        runtime.shutdown()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_check(check: Check, kit: Kit) -> dict:
    """One check under its own timer; whatever it raises becomes its row, and the next check runs."""
    row = {"check": check.name, "status": "skipped", "seconds": 0.0, "peak_gpu_memory_gib": None, "summary": "",
           "reason": check.needs_cuda, "details": {}}
    if check.needs_cuda and kit.device != "cuda":
        return row
    print(f"[{NAME}] {check.name} ...", flush=True)
    reset_peak_memory()
    began = time.perf_counter()
    try:
        details = check.run(kit)
        row.update(status="passed", reason=None, summary=details.pop("summary", ""), details=details)
    except Skipped as skipped:
        row.update(reason=str(skipped))
    except CheckFailed as failed:
        row.update(status="failed", reason=str(failed), summary=failed.details.pop("summary", ""),
                   details=failed.details)
    except Exception as error:  # any other error fails this check only; its traceback goes to stderr
        traceback.print_exc()
        row.update(status="failed", reason=error_line(error))
    finally:
        _settle()
    row.update(seconds=round(time.perf_counter() - began, 2), peak_gpu_memory_gib=peak_memory_gib())
    print(f"[{NAME}] {check.name}: {row['status']} in {row['seconds']} s {row['reason'] or row['summary']}", flush=True)
    return row


COLUMNS = [("check", "check"), ("status", "status"), ("seconds", "seconds"), ("peak_gpu_memory_gib", "peak GPU GiB"),
           ("summary", "result"), ("reason", "reason / error")]


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help=f"directory for {NAME}.json and {NAME}.md")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda (default): the first visible GPU; cpu: CUDA hidden, CUDA-only checks skipped")
    parser.add_argument("--tiny", action="store_true", help="2-layer models and short runs (the CPU suite's smoke run)")
    parser.add_argument("--checks", nargs="*", default=None, metavar="NAME",
                        help=f"run only these checks (default: all of {[check.name for check in CHECKS]})")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where the models and outputs go while it runs (a temporary directory, removed after)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.checks or []) - {check.name for check in CHECKS})
    if unknown:
        parser.error(f"--checks: unknown {unknown}; choose from {[check.name for check in CHECKS]}")
    return args


def select_device(device: str) -> None:
    """Before torch is imported: --device cpu hides every GPU, so nemo-optim's runtime (which asks
    torch.cuda.is_available()) runs its CPU path; nothing is downloaded."""
    if device == "cpu":
        if "torch" in sys.modules:
            raise RuntimeError("--device cpu must be chosen before torch is imported (run this module as a script).")
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device cuda: torch {torch.__version__} sees no CUDA device; run on a GPU node, "
                         f"or use --device cpu --tiny for the CPU smoke run.")


# what every check imports: without one of them each check would fail on the same ImportError
REQUIRED_MODULES = ("transformers", "tokenizers", "safetensors", "megatron.core", "modelopt.torch.quantization")


def missing_library() -> str | None:
    """One line naming a library this Python cannot import, with what to install; None when all import."""
    import importlib

    for module in REQUIRED_MODULES:
        try:
            importlib.import_module(module)
        except ImportError as error:
            return (f"cannot import {module} ({error_line(error)}); on a GPU node install the kit's wheels: "
                    f"python -m benchmarks.gpu_wheels where there is a network, then the pip line it prints "
                    f"(README: GPU acceptance kit)")
    return None


def write_report(rows: list[dict], kit: Kit, total_seconds: float, out: Path) -> None:
    from benchmarks.common import write_results

    counts = {status: sum(row["status"] == status for row in rows) for status in ("passed", "failed", "skipped")}
    within = total_seconds <= BUDGET_SECONDS
    notes = (f"{'Tiny models (--tiny)' if kit.tiny else 'SmolLM2-135M and Llama-3.2-1B shapes'}, random weights from "
             f"fixed seeds, on {device_name()}: {counts['passed']} passed, {counts['failed']} failed, "
             f"{counts['skipped']} skipped, {total_seconds:.0f} s ({'within' if within else 'OVER'} the "
             f"{BUDGET_SECONDS // 60}-minute budget). Command: python -m benchmarks.{NAME} --device {kit.device}"
             f"{' --tiny' if kit.tiny else ''} --out DIR. Numbers of each check: {NAME}.json.")
    write_results(NAME, rows, COLUMNS, notes, out, extra={
        "device": kit.device, "device_name": device_name(), "tiny": kit.tiny, "counts": counts,
        "total_seconds": round(total_seconds, 1), "budget_seconds": BUDGET_SECONDS, "within_budget": within,
        "shapes": {key: dataclasses.asdict(shape) for key, shape in kit.shapes.items()},
        "sizes": dataclasses.asdict(kit.sizes)})


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    began = time.perf_counter()
    select_device(args.device)
    missing = missing_library()
    if missing:
        print(f"error: {missing}", file=sys.stderr)
        return 2
    chosen = [check for check in CHECKS if args.checks is None or check.name in args.checks]
    with tempfile.TemporaryDirectory(prefix=f"{NAME}_", dir=args.work_dir) as work:
        os.environ["NEMO_OPTIM_CACHE"] = str(Path(work) / "cache")  # self-distillation data etc. stay in here
        kit = Kit(args.device, args.tiny, Path(work))
        rows = [run_check(check, kit) for check in chosen]
    total = time.perf_counter() - began
    write_report(rows, kit, total, args.out)
    failed = [row["check"] for row in rows if row["status"] == "failed"]
    if failed or total > BUDGET_SECONDS:
        print(f"{NAME}: failed {failed}" + ("" if total <= BUDGET_SECONDS else f"; {total:.0f} s is over the budget"),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
