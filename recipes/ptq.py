"""PTQ recipes: `ptq_recipe` and named variants (`nemo llm ptq --factory NAME`)."""

from typing import Optional

import nemo_run as run

from nemo_optim.models.hf import SMOLLM2
from nemo_optim.quantization.config import ExportConfig, QuantizationConfig
from nemo_optim.stages.ptq import ptq


@run.cli.factory(target=ptq)
def ptq_recipe(
    model_path: str = SMOLLM2,
    export_path: str = "outputs/smollm2_135m/ptq_fp8",
    algorithm: Optional[str] = "fp8",
    export_format: str = "hf",
    export_dtype: str = "bf16",
    calibration_tp: int = 1,
    calibration_pp: int = 1,
    calibration_dataset_size: int = 64,
    calibration_seq_len: int = 256,
    awq_block_size: int = 128,
    calibration_algorithm: Optional[str] = None,
    model_dtype: Optional[str] = None,
    transformer_impl: Optional[str] = None,
) -> run.Partial[ptq]:
    """Quantize a model with ModelOpt and export it (unified HF or TensorRT-LLM)."""
    return run.Partial(
        ptq,
        model_path=model_path,
        export_path=export_path,
        export_config=run.Config(ExportConfig, export_format=export_format, dtype=export_dtype),
        calibration_tp=calibration_tp,
        calibration_pp=calibration_pp,
        quantization_config=run.Config(
            QuantizationConfig,
            algorithm=algorithm,
            awq_block_size=awq_block_size,
            calibration_algorithm=calibration_algorithm,
            calibration_dataset_size=calibration_dataset_size,
            calibration_seq_len=calibration_seq_len,
        ),
        model_dtype=model_dtype,
        transformer_impl=transformer_impl,
    )


def _smollm2_cpu(algorithm: str, export_format: str = "trtllm", **overrides) -> run.Partial[ptq]:
    """The base of the SmolLM2-135M CPU variants: fp32 calibration, export to
    outputs/smollm2_135m/ptq_<algorithm> (TensorRT-LLM in fp16, or unified HF in bf16)."""
    return ptq_recipe(export_path=f"outputs/smollm2_135m/ptq_{algorithm}", algorithm=algorithm,
                      export_format=export_format, export_dtype="fp16" if export_format == "trtllm" else "bf16",
                      model_dtype="float32", **overrides)


@run.cli.factory(target=ptq)
def smollm2_135m_ptq_fp8_cpu() -> run.Partial[ptq]:
    """SmolLM2-135M, FP8 W8A8, unified HF export; fp32 calibration on CPU."""
    return _smollm2_cpu("fp8", export_format="hf")


@run.cli.factory(target=ptq)
def smollm2_135m_ptq_fp8_pc_pt_cpu() -> run.Partial[ptq]:
    """SmolLM2-135M, FP8 W8A8 with per-channel weight and per-token activation scales, max +
    GPTQ-lite: the best FP8 row of benchmarks/results/ptq.md (+1.6% perplexity; per-tensor
    `fp8` +1.9%). TensorRT-LLM export: ModelOpt's megatron HF exporter cannot write this format."""
    return _smollm2_cpu("fp8_pc_pt")


@run.cli.factory(target=ptq)
def smollm2_135m_ptq_int8_sq_cpu() -> run.Partial[ptq]:
    """SmolLM2-135M, INT8 SmoothQuant W8A8, TensorRT-LLM export (the HF exporter has no INT8).
    ModelOpt's auto_quantize keeps the most sensitive layers, at most 5% of the decoder's linear
    weights, in 16 bits: +1.7% perplexity instead of +4.1% (benchmarks/results/ptq.md)."""
    recipe = _smollm2_cpu("int8_sq")
    recipe.quantization_config.auto_quantize_bits = 8.38  # ModelOpt's count: int8 = 8, unquantized = 16
    recipe.quantization_config.auto_quantize_formats = ["int8_sq"]
    return recipe


@run.cli.factory(target=ptq)
def smollm2_135m_ptq_int4_awq_cpu() -> run.Partial[ptq]:
    """SmolLM2-135M, INT4 AWQ weight-only, block 64, TensorRT-LLM export."""
    return _smollm2_cpu("int4_awq", awq_block_size=64)


@run.cli.factory(target=ptq)
def smollm2_135m_ptq_int4_cpu() -> run.Partial[ptq]:
    """SmolLM2-135M, INT4 weight-only, block 32 (4.5 effective bits), max + GPTQ-lite,
    TensorRT-LLM export: the best INT4 PTQ row of benchmarks/results/ptq.md. Its native
    checkpoint (outputs/smollm2_135m/ptq_int4_native) is the student of
    smollm2_135m_distill_qad_int4_cpu."""
    return _smollm2_cpu("int4", awq_block_size=32)


@run.cli.factory(target=ptq)
def llama31_8b_ptq_fp8_8gpu_h100_bf16() -> run.Partial[ptq]:
    """Llama-3.1-8B-Instruct (an HF directory on the cluster), FP8, calibrated at TP=8 in bf16
    with Transformer Engine norms; FP8 KV cache on by default. Launch with 8 GPUs."""
    return ptq_recipe(
        model_path="/models/Llama-3.1-8B-Instruct",
        export_path="/results/llama31_8b_fp8",
        algorithm="fp8",
        calibration_tp=8,
        calibration_dataset_size=512,
        calibration_seq_len=4096,
        model_dtype="bfloat16",
        transformer_impl="modelopt",
    )

