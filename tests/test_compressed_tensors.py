"""The compressed-tensors export: written from ModelOpt's calibrated quantizers (no second
calibration), read back with the compressed-tensors library (and transformers, an independent
reader), refused in one line where ModelOpt's config has no compressed-tensors equivalent.
Serving these exports in vLLM is tests/test_engine_exports.py (marked `engine`)."""

from __future__ import annotations

import json

import pytest
import torch

from nemo_optim import runtime
from nemo_optim.models.forward import forward_logits
from nemo_optim.models.loader import load_model
from nemo_optim.quantization.compressed_tensors import dequantized_weights, quantized_tensors
from nemo_optim.quantization.config import ExportConfig, QuantizationConfig, QuantizationConfigError
from nemo_optim.stages.ptq import ptq
from tiny_models import make_tiny_hf_model

CALIBRATION = dict(calibration_dataset_size=8, calibration_seq_len=64, awq_block_size=32)
# SmoothQuant/AWQ input scales of the attention output projection cannot be folded under GQA
NOT_O_PROJ = dict(exclude_modules=["*linear_proj*"])
FORMATS = {"int8": "int-quantized", "int8_sq": "int-quantized", "fp8": "float-quantized",
           "fp8_pc_pt": "float-quantized", "int8_wo": "pack-quantized", "int4": "pack-quantized",
           "int4_awq": "pack-quantized"}


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory, tiny_tokenizer):
    """A tiny Llama with head size 32 (the engine tests serve the same shape)."""
    return make_tiny_hf_model("llama", tmp_path_factory.mktemp("wide") / "llama", tiny_tokenizer, hidden_size=128)


def _export(source, tmp_path, algorithm: str, **extra):
    out = tmp_path / f"ct_{algorithm}"
    ptq(model_path=str(source), quantization_config=QuantizationConfig(algorithm=algorithm, **CALIBRATION, **extra),
        export_config=ExportConfig(path=str(out), export_format="compressed_tensors", dtype="float32"))
    return out


@pytest.mark.parametrize("algorithm", list(FORMATS))
def test_export_holds_modelopts_codes_and_scales(algorithm, wide_llama, tmp_path):
    extra = NOT_O_PROJ if algorithm in ("int8_sq", "int4_awq") else {}
    out = _export(wide_llama, tmp_path, algorithm, **extra)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == FORMATS[algorithm]
    # vLLM reads `ignore` (not ModelOpt's exclude_modules): lm_head, and o_proj where it was excluded
    assert "lm_head" in config["ignore"]
    assert any("o_proj" in name for name in config["ignore"]) == bool(extra)

    with runtime.parallel_runtime(runtime.ParallelConfig()):
        expected = quantized_tensors(load_model(f"{out}_native").model)
    served = dequantized_weights(out)
    weights = {name: entry["weight"] for name, entry in expected.items() if "weight" in entry}
    assert set(served) == set(weights) and len(weights) == (12 if extra else 14)
    for name, fake_quant in weights.items():
        # compressed-tensors computes code * (amax / bound), ModelOpt code / (bound / amax): the
        # same codes give weights within two float32 ulps (a wrong code is a whole step off)
        ulps = (served[name] - fake_quant).abs() / (torch.finfo(torch.float32).eps * fake_quant.abs()).clamp_min(1e-30)
        assert ulps.max() <= 2, (name, ulps.max())


@pytest.mark.parametrize("algorithm", ["int4_awq", "int8_wo"])
def test_transformers_reads_the_weight_only_exports_as_the_fake_quantized_model(algorithm, wide_llama, tmp_path):
    """Weight-only formats have no activation rounding: transformers' compressed-tensors loader
    (decompressing) gives the fake-quantized model's logits, AWQ's scales folded into the norms
    and up-projection rows included."""
    import transformers
    from transformers.utils.quantization_config import CompressedTensorsConfig

    extra = NOT_O_PROJ if algorithm == "int4_awq" else {}
    out = _export(wide_llama, tmp_path, algorithm, **extra)
    tokens = torch.randint(1, 500, (2, 33), generator=torch.Generator().manual_seed(0))
    with runtime.parallel_runtime(runtime.ParallelConfig()):
        ours = forward_logits(load_model(f"{out}_native").model, tokens)
        unquantized = forward_logits(load_model(str(wide_llama)).model, tokens)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(out), quantization_config=CompressedTensorsConfig(run_compressed=False), dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(tokens[:, :-1]).logits.float()
    # exact up to float32 reduction order; the quantization itself moved the logits far more
    assert (theirs - ours).abs().max() < 1e-4
    assert (unquantized - ours).abs().max() > 100 * (theirs - ours).abs().max()


def test_configs_without_an_equivalent_are_refused_before_calibrating(wide_llama, tiny_hf_models, tmp_path):
    with pytest.raises(QuantizationConfigError, match=r"algorithm='w4a8_awq' cannot be written with "
                                                      r"export_config.export_format='compressed_tensors': its weights"):
        _export(wide_llama, tmp_path, "w4a8_awq")
    with pytest.raises(QuantizationConfigError,
                       match=r"\(smoothquant\) with export_config.export_format='compressed_tensors'"
                             r".*4 heads share 2 KV groups.*add '\*linear_proj\*'"):
        _export(wide_llama, tmp_path, "int8_sq")
    with pytest.raises(QuantizationConfigError, match="enable_kv_cache=True"):
        _export(wide_llama, tmp_path, "fp8", enable_kv_cache=True)
    assert not any(tmp_path.iterdir())  # nothing written, not even the native checkpoint
