"""PTQ on a tiny real Llama: every CPU format, ModelOpt config forms, save/restore, export
and its format guard, and bad configs."""

from __future__ import annotations

import copy
import json
import re

import modelopt.torch.quantization as mtq
import pytest
import torch
import torch.nn.functional as F

from nemo_optim import checkpoint, compat, runtime
from nemo_optim.progress import progress_over_layers
from nemo_optim.data.corpus import DataError
from nemo_optim.models.forward import forward_logits
from nemo_optim.models.loader import load_model
from nemo_optim.quantization import modelopt_config
from nemo_optim.quantization.config import (ALGORITHMS, PRESET_METHODS, ExportConfig, QuantizationConfig,
                                            QuantizationConfigError)
from nemo_optim.stages.ptq import ptq
from nemo_optim.quantization.quantizer import (ExportVerificationError, auto_quantize, calibration_batches,
                                               calibration_loop, quantize, verify_export)
from tiny_models import VOCAB_SIZE

CPU_ALGORITHMS = [a for a in ALGORITHMS if a != "nvfp4"]


def _tokens(seed=0):
    return torch.randint(0, VOCAB_SIZE, (4, 33), generator=torch.Generator().manual_seed(seed))


def _config(algorithm, **kwargs):
    return QuantizationConfig(algorithm=algorithm, awq_block_size=32, calibration_dataset_size=8,
                              calibration_batch_size=4, calibration_seq_len=64, **kwargs)


@pytest.mark.parametrize("algorithm", CPU_ALGORITHMS)
def test_each_cpu_algorithm_quantizes_every_decoder_linear(algorithm, tiny_hf_models, tiny_tokenizer, runtime_single):
    tokens = _tokens()
    loaded = load_model(tiny_hf_models["llama"])
    reference = forward_logits(loaded.model, tokens)
    model, summary = quantize(loaded.model, _config(algorithm), tokenizer=tiny_tokenizer)
    logits = forward_logits(model, tokens)
    assert summary.enabled_quantizers >= 8 and summary.quantized_linear_share == 1.0
    kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(reference, -1), log_target=True,
                  reduction="batchmean").item() / tokens.shape[1]
    assert 0 < (logits - reference).abs().max().item()
    assert kl < 0.05, f"{algorithm}: KL to fp32 {kl}"
    # block 32: 4 + 16/32 bits. Per-channel int8: 8 + 32/in_features, weighted by size over
    # qkv 128x64, proj 64x64, fc1 256x64 (+0.5) and fc2 64x128 (+0.25) = 8 + 16384/36864.
    expected_bits = {"int4": 4.5, "int4_awq": 4.5, "w4a8_awq": 4.5, "int8_wo": 8 + 16384 / 36864, "fp8": 8.0}
    if algorithm in expected_bits:
        assert summary.effective_bits == pytest.approx(expected_bits[algorithm], abs=0.01)


def test_our_config_equals_the_raw_modelopt_preset(tiny_hf_models, tiny_tokenizer, runtime_single):
    """Oracle: ModelOpt's own INT4_AWQ preset through plain mtq.quantize gives the same model."""
    config = _config("int4_awq")
    forward_loop = calibration_loop(config, tiny_tokenizer)
    tokens = _tokens(1)
    ours = forward_logits(quantize(load_model(tiny_hf_models["llama"]).model, config, forward_loop)[0], tokens)
    raw_config = copy.deepcopy(mtq.INT4_AWQ_CFG)
    quant_cfg = raw_config["quant_cfg"]  # a dict up to ModelOpt 0.43, a list of entries from 0.44
    weight_cfg = (quant_cfg["*weight_quantizer"] if isinstance(quant_cfg, dict)
                  else next(e["cfg"] for e in quant_cfg if e["quantizer_name"] == "*weight_quantizer"))
    weight_cfg["block_sizes"][-1] = 32
    raw = forward_logits(mtq.quantize(load_model(tiny_hf_models["llama"]).model, raw_config, forward_loop), tokens)
    torch.testing.assert_close(ours, raw, rtol=0, atol=0)


def test_tuned_calibration_is_modelopts_gptq_lite_chain_and_beats_the_preset(tiny_hf_models, tiny_tokenizer,
                                                                             runtime_single):
    """Oracles: raw mtq.quantize with the same method chain, and the unquantized model. The
    default FP8 calibration (max, then GPTQ-lite) must land closer to fp32 than the preset's
    max calibration alone, which `calibration_algorithm="preset"` still gives exactly. With
    gptq_hessian_budget=0 (one pass) it is ModelOpt's chain exactly; by default the tiny model's
    two layers take a pass each: the first layer's weights are the same as in one pass (same
    Hessians), the second's see the first's GPTQ-updated weights, and the result stays as close
    to fp32 as one pass."""
    tuned = _config("fp8")
    forward_loop = calibration_loop(tuned, tiny_tokenizer)
    # the held-out text: calibration-like, unseen samples
    tokens = torch.cat(calibration_batches(_config("fp8", calibration_dataset="embedded:docstrings"), tiny_tokenizer))
    reference = forward_logits(load_model(tiny_hf_models["llama"]).model, tokens)

    def quantized(config=None, raw_config=None):
        model = load_model(tiny_hf_models["llama"]).model
        if raw_config is not None:
            model = mtq.quantize(model, raw_config, forward_loop)
        else:
            model, _ = quantize(model, config, forward_loop)
        return model, forward_logits(model, tokens)

    def kl(logits):
        return F.kl_div(F.log_softmax(logits, -1), F.log_softmax(reference, -1), log_target=True,
                        reduction="batchmean").item()

    chain = {"quant_cfg": copy.deepcopy(mtq.FP8_DEFAULT_CFG["quant_cfg"]),
             "algorithm": [{"method": "max"}, {"method": compat.gptq_method(), "block_size": 128}]}
    raw_model, raw = quantized(raw_config=chain)
    one_pass = quantized(_config("fp8", gptq_hessian_budget=0))[1]
    torch.testing.assert_close(one_pass, raw, rtol=0, atol=0)
    passes_model, passes = quantized(tuned)
    layers = passes_model.decoder.layers, raw_model.decoder.layers
    for name in ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2"):
        first, first_raw = (layer[0].get_submodule(name).weight for layer in layers)
        second, second_raw = (layer[1].get_submodule(name).weight for layer in layers)
        torch.testing.assert_close(first, first_raw, rtol=0, atol=0)
        assert not torch.equal(second, second_raw), name
    preset = quantized(_config("fp8", calibration_algorithm="preset"))[1]
    torch.testing.assert_close(preset, quantized(raw_config=copy.deepcopy(mtq.FP8_DEFAULT_CFG))[1], rtol=0, atol=0)
    assert kl(one_pass) < kl(preset) and kl(passes) < kl(preset), (kl(one_pass), kl(passes), kl(preset))
    assert kl(passes) < 1.1 * kl(one_pass), (kl(passes), kl(one_pass))


def test_gptq_passes_keep_one_group_of_hessians_at_a_time(tiny_hf_models, tiny_tokenizer, runtime_single, monkeypatch):
    """Each GPTQ-lite pass sees only its group's weight quantizers switched on (ModelOpt collects a
    Hessian for exactly those) and, at PP=1, runs the decoder only up to the group's last layer;
    everything is switched back on after."""
    from nemo_optim.quantization import gptq_passes

    model = load_model(tiny_hf_models["llama"]).model
    layer_bytes = gptq_passes.hessian_bytes(model.decoder.layers[0])
    assert layer_bytes == 0  # nothing quantized yet
    seen = []
    original = mtq.calibrate

    def recording_calibrate(model, algorithm, forward_loop):
        if isinstance(algorithm, dict) and algorithm["method"] == compat.gptq_method():
            enabled = [name for name, m in model.named_modules()
                       if getattr(m, "weight_quantizer", None) is not None and m.weight_quantizer.is_enabled]
            seen.append((len(model.decoder.layers), sorted({name.split(".")[2] for name in enabled})))
        return original(model, algorithm, forward_loop)

    monkeypatch.setattr(mtq, "calibrate", recording_calibrate)
    quantized, summary = quantize(model, _config("fp8"), tokenizer=tiny_tokenizer)
    assert seen == [(1, ["0"]), (2, ["1"])], seen
    assert len(quantized.decoder.layers) == 2 and summary.quantized_linear_share == 1.0
    assert gptq_passes.hessian_bytes(quantized.decoder.layers[0]) == 4 * (3 * 64 ** 2 + 128 ** 2)
    # a budget that holds both layers' Hessians: one pass, as ModelOpt runs it
    seen.clear()
    quantize(load_model(tiny_hf_models["llama"]).model, _config("fp8", gptq_hessian_budget=10.0),
             tokenizer=tiny_tokenizer)
    assert seen == [(2, ["0", "1"])], seen


def test_preset_methods_table_matches_modelopt():
    for algorithm, (preset, _) in ALGORITHMS.items():
        method = getattr(mtq, preset)["algorithm"]
        method = method if isinstance(method, str) else method["method"]
        assert PRESET_METHODS.get(algorithm, "max") == method, algorithm


def test_config_forms_round_trip():
    for preset in ("FP8_DEFAULT_CFG", "INT4_AWQ_CFG", "W4A8_AWQ_BETA_CFG", "INT8_SMOOTHQUANT_CFG"):
        raw = getattr(mtq, preset)["quant_cfg"]
        entries = modelopt_config.entries_from_modelopt(raw)
        as_list = modelopt_config.entries_to_modelopt(entries, form="list")
        assert all("quantizer_name" in entry for entry in as_list)
        assert modelopt_config.entries_from_modelopt(as_list) == entries
        assert modelopt_config.entries_to_modelopt(entries, form="list" if isinstance(raw, list) else "dict") == raw
    listed = modelopt_config.entries_to_modelopt(modelopt_config.preset_entries("FP8_DEFAULT_CFG")[0], form="list")
    assert {"quantizer_name": "*", "parent_class": "nn.BatchNorm1d", "enable": False} in listed


def test_smoothquant_alpha_is_applied_and_exclusions_are_honoured(tiny_hf_models, tiny_tokenizer, runtime_single):
    tokens = _tokens(2)
    # Oracle: without sq_alpha, int8_sq is ModelOpt's INT8_SMOOTHQUANT preset (alpha 1.0), as NeMo 2 ran it.
    config = _config("int8_sq")
    forward_loop = calibration_loop(config, tiny_tokenizer)
    ours = forward_logits(quantize(load_model(tiny_hf_models["llama"]).model, config, forward_loop)[0], tokens)
    raw = mtq.quantize(load_model(tiny_hf_models["llama"]).model, copy.deepcopy(mtq.INT8_SMOOTHQUANT_CFG), forward_loop)
    torch.testing.assert_close(ours, forward_logits(raw, tokens), rtol=0, atol=0)
    outputs = []
    for alpha in (0.1, 0.9):
        model, _ = quantize(load_model(tiny_hf_models["llama"]).model, _config("int8_sq", sq_alpha=alpha),
                            tokenizer=tiny_tokenizer)
        outputs.append(forward_logits(model, tokens))
    assert (outputs[0] - outputs[1]).abs().max().item() > 1e-4
    model, summary = quantize(load_model(tiny_hf_models["llama"]).model,
                              _config("fp8", exclude_modules=["*layers.0.*"]), tokenizer=tiny_tokenizer)
    assert not model.decoder.layers[0].mlp.linear_fc1.weight_quantizer.is_enabled
    assert model.decoder.layers[1].mlp.linear_fc1.weight_quantizer.is_enabled
    assert summary.quantized_linear_share == pytest.approx(0.5)
    model, _ = quantize(load_model(tiny_hf_models["llama"]).model, _config("fp8", exclude_last_layers=1),
                        tokenizer=tiny_tokenizer)
    assert model.decoder.layers[0].mlp.linear_fc1.weight_quantizer.is_enabled
    assert not model.decoder.layers[1].self_attention.linear_qkv.input_quantizer.is_enabled
    with pytest.raises(QuantizationConfigError, match="leaves none of the 2 layers quantized"):
        quantize(load_model(tiny_hf_models["llama"]).model,
                 _config("fp8", exclude_first_layers=1, exclude_last_layers=1), tokenizer=tiny_tokenizer)


def test_quantized_checkpoint_restores_exactly(tiny_hf_models, tiny_tokenizer, runtime_single, tmp_path):
    tokens = _tokens(3)
    loaded = load_model(tiny_hf_models["qwen3"])
    model, _ = quantize(loaded.model, _config("w4a8_awq"), tokenizer=tiny_tokenizer)
    expected = forward_logits(model, tokens)
    checkpoint.save_checkpoint(model, loaded.config, tmp_path / "q", loaded.hf_dir)
    restored = load_model(tmp_path / "q").model
    assert restored.decoder.layers[0].mlp.linear_fc1.weight_quantizer[0].is_enabled
    torch.testing.assert_close(forward_logits(restored, tokens), expected, rtol=0, atol=0)


def test_hf_export_that_releases_the_layers_writes_the_same_files(tiny_hf_models, tiny_tokenizer, runtime_single,
                                                                  tmp_path):
    """The ptq stage lets the unified HF export free each decoder layer once it is converted (the
    stage is done with the model). Oracle: the export of the same model that keeps its layers."""
    from safetensors.torch import load_file

    from nemo_optim.models.hf import write_hf_export

    loaded = load_model(tiny_hf_models["llama"])
    model, _ = quantize(loaded.model, _config("fp8"), tokenizer=tiny_tokenizer)
    write_hf_export(model, loaded.hf_dir, tmp_path / "kept", torch.float32)
    assert all(p.numel() for p in model.decoder.parameters())
    write_hf_export(model, loaded.hf_dir, tmp_path / "released", torch.float32, release_exported_layers=True)
    released_weights = [name for name, p in model.decoder.layers.named_parameters() if not p.numel()]
    # 4 linears x 2 layers
    assert len(released_weights) == 8 and all(name.endswith("weight") for name in released_weights)

    def tensors(path):
        return {name: t for file in sorted(path.glob("*.safetensors")) for name, t in load_file(str(file)).items()}

    kept, released = tensors(tmp_path / "kept"), tensors(tmp_path / "released")
    assert sorted(released) == sorted(kept) and any(".mlp.gate_proj.weight" in name for name in kept)
    for name, tensor in kept.items():
        assert released[name].dtype == tensor.dtype and torch.equal(released[name], tensor), name
    for name in ("config.json", "hf_quant_config.json"):
        assert (tmp_path / "released" / name).read_text() == (tmp_path / "kept" / name).read_text()


def _ptq(model, path, algorithm, export_format, **kwargs):
    return ptq(model_path=str(model),
               export_config=ExportConfig(path=str(path), export_format=export_format, dtype="float32"),
               quantization_config=_config(algorithm), **kwargs)


def test_fp8_hf_export_passes_the_guard_and_a_tampered_one_fails(tiny_hf_models, tmp_path):
    export = _ptq(tiny_hf_models["llama"], tmp_path / "fp8", "fp8", "hf")
    assert json.loads((export / "hf_quant_config.json").read_text())["quantization"]["quant_algo"] == "FP8"
    assert (tmp_path / "fp8_native" / "manifest.json").is_file()
    verify_export(export, "hf", {"FP8"})
    quant = json.loads((export / "hf_quant_config.json").read_text())
    quant["quantization"]["quant_algo"] = "W4A16_AWQ"
    (export / "hf_quant_config.json").write_text(json.dumps(quant))
    with pytest.raises(ExportVerificationError, match="declares quant_algo='W4A16_AWQ', but FP8 was requested"):
        verify_export(export, "hf", {"FP8"})
    (export / "hf_quant_config.json").unlink()
    with pytest.raises(ExportVerificationError, match="declares no quantization"):
        verify_export(export, "hf", {"FP8"})


def test_both_exports_show_progress_over_the_layers(tiny_hf_models, tmp_path, capfd):
    """ModelOpt's megatron exporters print no progress of their own; the export phase shows a bar
    over the decoder layers (2 here), for the HF export and for TensorRT-LLM's (whose exporter
    walks `layers.children()` and requires the list's type to be exactly ModuleList)."""
    for export_format in ("hf", "trtllm"):
        _ptq(tiny_hf_models["llama"], tmp_path / export_format, "fp8", export_format)
        err = capfd.readouterr().err
        assert re.search(r"export: 100%\|[^|]*\| 2/2 ", err), (export_format, err[-2000:])
    layers = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(3)])
    with progress_over_layers(layers, "walk"):
        assert list(layers) == list(layers._modules.values())
    assert "walk: 100%" in capfd.readouterr().err
    with progress_over_layers(layers, "children", keep_type=True):
        assert type(layers) is torch.nn.ModuleList
        assert list(layers.children()) == list(layers._modules.values())
    assert "children: 100%" in capfd.readouterr().err
    assert type(layers) is torch.nn.ModuleList and "children" not in vars(layers)


def test_silent_bf16_export_is_caught_and_the_native_checkpoint_avoids_recalibration(tiny_hf_models, tmp_path, capsys):
    with pytest.raises(ExportVerificationError, match="declares no quantization although W4A16_AWQ was requested"):
        _ptq(tiny_hf_models["llama"], tmp_path / "awq_hf", "int4_awq", "hf")
    assert not (tmp_path / "awq_hf").exists() and not list(tmp_path.glob(".*partial"))
    # calibration was saved before the export: export it again as TensorRT-LLM without recalibrating
    export = _ptq(tmp_path / "awq_hf_native", tmp_path / "awq_trt", "fp8", "trtllm")
    assert "already quantized (int4_awq): exporting without recalibration" in capsys.readouterr().out
    config = json.loads((export / "config.json").read_text())
    assert config["quantization"]["quant_algo"] == "W4A16_AWQ"
    assert (export / "rank0.safetensors").is_file()


def test_per_channel_fp8_refuses_the_hf_export_before_calibrating_and_exports_to_trtllm(tiny_hf_models, tmp_path):
    # ModelOpt's HF exporter raised a RuntimeError (a reshape of the QKV scales) after calibration
    with pytest.raises(QuantizationConfigError, match="algorithm='fp8_pc_pt' cannot be exported with "
                                                      "export_config.export_format='hf'.*use export_format=trtllm"):
        _ptq(tiny_hf_models["llama"], tmp_path / "pcpt", "fp8_pc_pt", "hf")
    assert not list(tmp_path.iterdir())
    export = _ptq(tiny_hf_models["llama"], tmp_path / "pcpt_trt", "fp8_pc_pt", "trtllm")
    assert json.loads((export / "config.json").read_text())["quantization"]["quant_algo"] == "FP8_PER_CHANNEL_PER_TOKEN"
    # a saved fp8_pc_pt checkpoint is refused too, whatever algorithm the call names
    with pytest.raises(QuantizationConfigError, match="algorithm='fp8_pc_pt' cannot be exported"):
        _ptq(tmp_path / "pcpt_trt_native", tmp_path / "pcpt_hf", "fp8", "hf")
    assert not (tmp_path / "pcpt_hf").exists()


@pytest.mark.parametrize("kwargs,message", [
    ({"algorithm": "fp7"}, "algorithm='fp7' is unknown; choose one of fp8, fp8_pc_pt"),
    ({"calibration_dataset_size": 0}, "calibration_dataset_size=0 must be at least 1"),
    ({"awq_block_size": 100}, "awq_block_size=100 must be a power of two"),
    ({"sq_alpha": 1.5}, "sq_alpha=1.5 must be in"),
    ({"calibration_algorithm": "max+gptq"}, "unknown method 'gptq'; join methods from preset, max"),
    ({"calibration_algorithm": "mse+gptq_lite"}, "gptq_lite cannot follow mse; drop gptq_lite or mse"),
    ({"algorithm": "int8_sq", "calibration_algorithm": "preset+gptq_lite"}, "gptq_lite cannot follow smoothquant"),
])
def test_invalid_quantization_configs(kwargs, message):
    with pytest.raises(QuantizationConfigError, match=message):
        QuantizationConfig(**kwargs)


def test_runtime_checks_fail_before_any_work(tiny_hf_models, tmp_path):
    if not runtime.use_cuda():
        with pytest.raises(QuantizationConfigError, match="'nvfp4' needs a CUDA GPU"):
            _ptq(tiny_hf_models["llama"], tmp_path / "nvfp4", "nvfp4", "hf")
    with pytest.raises(DataError, match="file not found"):
        ptq(model_path=str(tiny_hf_models["llama"]), export_config=ExportConfig(path=str(tmp_path / "x")),
            quantization_config=QuantizationConfig(calibration_dataset=str(tmp_path / "missing.jsonl")))
    with pytest.raises(QuantizationConfigError, match="export_format='onnx'"):
        ExportConfig(export_format="onnx")
    # the tiny model's hidden size 64 (SmolLM2's 576) is not a multiple of 128: ModelOpt would
    # calibrate, then fail while packing INT4 at export
    with pytest.raises(QuantizationConfigError, match=r"awq_block_size=128 does not divide .*hidden 64.*"
                                                      r"use awq_block_size=64"):
        ptq(model_path=str(tiny_hf_models["llama"]), export_config=ExportConfig(path=str(tmp_path / "int4")),
            quantization_config=QuantizationConfig(algorithm="int4_awq", awq_block_size=128))
    assert not list(tmp_path.iterdir())


def test_cli_errors_are_one_line_and_nonzero(capsys):
    import launch

    assert launch.main(["smollm2_135m_ptq_fp8_cpu", "quantization_config.algorithm=fp7", "--dryrun"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "algorithm='fp7' is unknown" in err[0]


@pytest.mark.distributed
@pytest.mark.parametrize("tp,pp,calibration", [(2, 1, "preset"), (1, 2, "preset"), (1, 2, None)],
                         ids=["tp2", "pp2", "pp2-gptq-passes"])
def test_calibration_at_tp2_or_pp2_exports_the_same_fp8_checkpoint(tp, pp, calibration, tiny_hf_models, tmp_path):
    """Oracle: the single-process export. Per-tensor amax must be synced across TP ranks and
    pipeline stages must each export their layers. Max calibration ("preset"): GPTQ-lite sees
    only its shard's Hessian in row-parallel layers, so at TP>1 it is close but not equal. At
    PP=2 the default (max + GPTQ-lite, one layer per pass on this model) forms the same passes
    by global layer number as one process (which also stops each pass's forward early)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from safetensors.torch import load_file

    repo = Path(__file__).resolve().parents[1]
    single = ptq(model_path=str(tiny_hf_models["llama"]),
                 export_config=ExportConfig(path=str(tmp_path / "single"), export_format="hf", dtype="float32"),
                 quantization_config=_config("fp8", calibration_algorithm=calibration))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               str(repo / "tests" / "distributed" / "ptq_worker.py"), "--model", str(tiny_hf_models["llama"]),
               "--export", str(tmp_path / "parallel"), "--tp", str(tp), "--pp", str(pp)]
    command += ["--calibration-algorithm", calibration] if calibration else []
    result = subprocess.run(command, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    def tensors(path):
        merged = {}
        for file in sorted(path.glob("*.safetensors")):
            merged.update(load_file(str(file)))
        return merged

    expected, got = tensors(single), tensors(tmp_path / "parallel")
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        # activation scales come from TP-split matmuls: equal up to float rounding
        rtol = 1e-5 if name.endswith("input_scale") else 0
        torch.testing.assert_close(got[name].float(), tensor.float(), rtol=rtol, atol=0, msg=name)


def test_trtllm_export_of_a_tied_model_shares_the_embedding_table(tiny_hf_models, tmp_path, capsys):
    """SmolLM2 ties its output layer to the embedding: ModelOpt's TensorRT-LLM exporter crashed on
    the output layer's missing weight. The export must share the table instead, holding the HF
    model's embedding; mixed precision from auto_quantize (a layer left in 16 bits) exports too."""
    import transformers
    from safetensors.torch import load_file

    hf_embedding = (transformers.AutoModelForCausalLM.from_pretrained(tiny_hf_models["llama_tied"])
                    .get_input_embeddings().weight)
    for name, config in (("int8_sq", _config("int8_sq")),
                         ("auto", _config("int8_sq", auto_quantize_bits=10.0, auto_quantize_formats=["int8_sq"]))):
        export = ptq(model_path=str(tiny_hf_models["llama_tied"]), quantization_config=config,
                     export_config=ExportConfig(path=str(tmp_path / name), export_format="trtllm", dtype="fp16"))
        exported = json.loads((export / "config.json").read_text())
        weights = load_file(export / "rank0.safetensors")
        assert exported["share_embedding_table"] is True
        assert not any("lm_head" in key for key in weights)
        torch.testing.assert_close(weights["transformer.vocab_embedding.weight"], hf_embedding.half(), rtol=0, atol=0)
    chosen = [line.rsplit(": ", 1)[1] for line in capsys.readouterr().out.splitlines()
              if line.startswith("  decoder.layers.")]
    assert "none" in chosen and set(chosen) <= {"int8_sq", "none"}, chosen


def test_auto_quantize_reports_a_format_per_layer_within_the_budget(tiny_hf_models, tmp_path, capsys):
    # ModelOpt counts the unquantized output_layer (512x64) at 16 bits: all-int4 is 7.7 bits
    # here, so a 6-bit budget cannot be met and is reported; 10 bits can.
    for bits, reachable in ((10.0, True), (6.0, False)):
        if not reachable and compat.at_least("nvidia-modelopt", "0.46"):  # refused instead
            with pytest.raises(QuantizationConfigError, match=r"auto_quantize_bits=6.0 is not reachable .* 7\.69"):
                ptq(model_path=str(tiny_hf_models["llama"]),
                    export_config=ExportConfig(path=str(tmp_path / f"auto{bits}"), export_format="trtllm"),
                    quantization_config=_config(None, auto_quantize_bits=bits,
                                                auto_quantize_formats=["fp8", "int4_awq"]))
            assert not (tmp_path / f"auto{bits}").exists()
            continue
        export = ptq(model_path=str(tiny_hf_models["llama"]),
                     export_config=ExportConfig(path=str(tmp_path / f"auto{bits}"), export_format="trtllm"),
                     quantization_config=_config(None, auto_quantize_bits=bits,
                                                 auto_quantize_formats=["fp8", "int4_awq"]))
        out = capsys.readouterr().out
        chosen = [line.rsplit(": ", 1)[1] for line in out.splitlines() if line.startswith("  decoder.layers.")]
        assert len(chosen) == 8 and set(chosen) <= {"fp8", "int4_awq"}
        assert ("is not reachable" in out) != reachable
        declared = json.loads((export / "config.json").read_text())["quantization"]["quant_algo"]
        assert declared in {"MIXED_PRECISION", "FP8", "W4A16_AWQ"}


def test_auto_quantize_recalibrates_the_chosen_formats_with_gptq_lite(tiny_hf_models, tiny_tokenizer, runtime_single):
    """int4 + int8_wo under 9 bits (ModelOpt's count; all-int4 is 7.7 here): the chosen formats
    are re-calibrated with GPTQ-lite, which must stay closer to fp32 on the calibration text than
    the search's own max calibration of the same per-layer formats."""
    reference_model = load_model(tiny_hf_models["llama"]).model
    results = {}
    for name, calibration in (("search only", "preset"), ("gptq_lite", None)):
        config = _config("int4", auto_quantize_bits=9.0, auto_quantize_formats=["int4", "int8_wo"],
                         calibration_algorithm=calibration)
        tokens = torch.cat(calibration_batches(config, tiny_tokenizer))
        searched = load_model(tiny_hf_models["llama"]).model
        model, summary = auto_quantize(searched, config, tiny_tokenizer,
                                       fresh_model=lambda: load_model(tiny_hf_models["llama"]).model)
        # re-calibrated on a fresh copy: the searched model's weights were released before it loaded
        assert all(p.is_meta for p in searched.parameters()) == (calibration is None)
        logits, reference = forward_logits(model, tokens), forward_logits(reference_model, tokens)
        kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(reference, -1), log_target=True,
                      reduction="batchmean").item()
        results[name] = (kl, dict(summary.per_layer_formats))
    formats = results["gptq_lite"][1]
    assert formats == results["search only"][1] and {"int4", "int8_wo"} <= set(formats.values())
    # the re-calibrated model keeps the search's choice: 16-bit layers stay unquantized
    weight_bits = {name.removesuffix(".weight_quantizer"): module.num_bits if module.is_enabled else None
                   for name, module in model.named_modules() if name.endswith("weight_quantizer")}
    assert {layer: weight_bits[layer] for layer in formats} == {
        layer: {"int4": 4, "int8_wo": 8, "none": None}[chosen] for layer, chosen in formats.items()}
    assert results["gptq_lite"][0] < 0.9 * results["search only"][0], results


def test_auto_quantize_scoring_holds_one_layer_and_equals_modelopts_whole_batch_backward(
        tiny_hf_models, tiny_tokenizer, runtime_single, monkeypatch):
    """Oracle: ModelOpt's own gradient scoring on plain autograd (whole logits, torch's cross
    entropy, the whole batch in one backward, every weight's gradient). nemo-optim's megatron
    support (each decoder layer recomputed in backward, one row per backward, chunked loss) must
    give the same sensitivity scores and choice while at most one decoder layer's modules hold
    their output errors at any moment (ModelOpt's plain path holds every layer's)."""
    from modelopt.torch.quantization import algorithms

    from nemo_optim.models.forward import make_batch
    from nemo_optim.quantization import auto_quantize_scoring

    batches = [make_batch(rows) for rows in calibration_batches(_config("fp8"), tiny_tokenizer)]
    entries, _ = modelopt_config.preset_entries("FP8_DEFAULT_CFG")
    fp8 = {"quant_cfg": modelopt_config.entries_to_modelopt(entries), "algorithm": "max"}

    score = algorithms._get_auto_quantize_score

    def search(**steps):
        model = load_model(tiny_hf_models["llama"]).model
        holding = []

        def counted_score(grad_output, output_diff):  # called by every module's scoring backward hook
            holding.append(sum(bool(getattr(m, "output_diff_dict", None)) for m in model.modules()))
            return score(grad_output, output_diff)

        with monkeypatch.context() as patch:
            patch.setattr(algorithms, "_get_auto_quantize_score", counted_score)
            _, state = mtq.auto_quantize(model, constraints={"effective_bits": 12.0}, quantization_formats=[fp8],
                                         data_loader=batches, disabled_layers=["*output_layer*"],
                                         num_calib_steps=len(batches), num_score_steps=len(batches), **steps)
        assert not any("forward" in vars(layer) for layer in model.decoder.layers)  # the recompute is undone
        return ({name: stats["scores"] for name, stats in state["candidate_stats"].items()}, state["best"]["recipe"],
                max(holding))

    auto_quantize_scoring.register_megatron_scoring()
    ours, our_choice, our_holders = search(forward_step=auto_quantize_scoring.forward_step,
                                           forward_backward_step=auto_quantize_scoring.forward_backward_step)
    searcher = algorithms.AutoQuantizeGradientSearcher
    monkeypatch.setattr(searcher, "_custom_support", [
        support for support in searcher._custom_support
        if support[1] is not auto_quantize_scoring.recompute_decoder_layers])
    plain, plain_choice, plain_holders = search(
        forward_step=lambda model, batch: model(batch["input_ids"], batch["position_ids"], None),
        loss_func=lambda logits, batch: F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten()))
    assert ours.keys() == plain.keys()
    for name in ours:
        assert ours[name] == pytest.approx(plain[name], rel=1e-3), name
    decoder = [scores for name, scores in ours.items() if name.startswith("decoder.layers.")]
    assert len(decoder) == 8 and min(scores[0] for scores in decoder) > 0  # [fp8, 16 bits (0)]
    assert {str(k): str(v) for k, v in our_choice.items()} == {str(k): str(v) for k, v in plain_choice.items()}
    assert (our_holders, plain_holders) == (4, 8)  # qkv, proj, fc1, fc2 of one layer / of both


def test_custom_config_file_in_either_form_matches_the_preset(tiny_hf_models, tiny_tokenizer, runtime_single, tmp_path):
    """A JSON ModelOpt config (JSON turns (4, 3) into [4, 3] and -1 keys into "-1") gives the
    same model as the preset it was written from, in dict and in list form."""
    tokens = _tokens(5)
    preset, _ = quantize(load_model(tiny_hf_models["llama"]).model, _config("int4_awq"), tokenizer=tiny_tokenizer)
    reference = forward_logits(preset, tokens)
    entries, algorithm = modelopt_config.preset_entries("INT4_AWQ_CFG")
    modelopt_config.set_block_size(entries, 32)
    for form in ("dict", "list"):
        path = tmp_path / f"{form}.json"
        path.write_text(json.dumps({"quant_cfg": modelopt_config.entries_to_modelopt(entries, form=form),
                                    "algorithm": algorithm}))
        model, _ = quantize(load_model(tiny_hf_models["llama"]).model, _config(None, custom_config_path=str(path)),
                            tokenizer=tiny_tokenizer)
        torch.testing.assert_close(forward_logits(model, tokens), reference, rtol=0, atol=0)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(QuantizationConfigError, match="not a ModelOpt config"):
        quantize(load_model(tiny_hf_models["llama"]).model,
                 _config(None, custom_config_path=str(tmp_path / "bad.json")), tokenizer=tiny_tokenizer)


def test_per_token_fp8_rounding_matches_torch_e4m3_and_its_floor():
    """The activation quantizer behind the README's FP8 floor (benchmarks/fp8_rounding.py: ModelOpt's
    per-token FP8 preset) is torch's own E4M3 cast with one scale per token, so its error is the
    format's, not ModelOpt's."""
    from nemo_optim.quantization.modelopt_config import preset_quantizer

    quantizer = preset_quantizer("FP8_PER_CHANNEL_PER_TOKEN_CFG")
    x = torch.randn(64, 576, generator=torch.Generator().manual_seed(0))
    x[3] *= 1000  # a loud token must not coarsen the others
    scale = x.abs().amax(-1, keepdim=True) / torch.finfo(torch.float8_e4m3fn).max
    oracle = (x / scale).to(torch.float8_e4m3fn).float() * scale
    assert torch.allclose(quantizer(x), oracle, rtol=1e-6, atol=0)
    assert 6e-4 < ((quantizer(x) - x).pow(2).sum() / x.pow(2).sum()).item() < 8e-4


@pytest.mark.parametrize("algorithm", ["int8_sq", "int4_awq", "fp8"])
def test_calibration_without_the_output_layer_gives_the_same_model(algorithm, tiny_hf_models, tiny_tokenizer,
                                                                   runtime_single):
    """Calibration passes stop before the output layer when it has no enabled quantizer (memory and
    time of the logits): the model comes out exactly as from full forward passes."""
    config = _config(algorithm)
    batches = calibration_batches(config, tiny_tokenizer)

    def full_forward_passes(model):
        for batch in batches:
            forward_logits(model, batch)

    tokens = _tokens(6)
    ours, _ = quantize(load_model(tiny_hf_models["llama_tied"]).model, config, tokenizer=tiny_tokenizer)
    full, _ = quantize(load_model(tiny_hf_models["llama_tied"]).model, config, full_forward_passes)
    assert ours.post_process  # restored after calibration
    torch.testing.assert_close(forward_logits(ours, tokens), forward_logits(full, tokens), rtol=0, atol=0)


@pytest.mark.skipif(not compat.resumable_layerwise_calibration(),
                    reason="resumable layer-wise calibration needs nvidia-modelopt >= 0.46 (the current leg)")
@pytest.mark.parametrize("algorithm", ["fp8", "int8_sq"])
def test_a_killed_layerwise_calibration_resumes_and_equals_the_uninterrupted_run(algorithm, tiny_hf_models, tmp_path):
    """The ptq stage SIGKILLed while recording decoder layer 1 (layer 0 recorded, layer 1 calibrated
    and lost) resumes at layer 1 when run again, and its quantized checkpoint equals the one of an
    uninterrupted run: every weight and scale bit for bit."""
    import io
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]

    def run_stage(name, *extra):
        command = [sys.executable, str(repo / "tests" / "distributed" / "killed_calibration_worker.py"),
                   "--model", str(tiny_hf_models["llama"]), "--export", str(tmp_path / name),
                   "--checkpoint-dir", str(tmp_path / f"{name}_layers"), "--algorithm", algorithm,
                   "--export-format", "trtllm" if algorithm == "int8_sq" else "hf", *extra]
        return subprocess.run(command, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(repo)})

    whole = run_stage("whole")
    assert whole.returncode == 0, whole.stdout[-3000:] + whole.stderr[-3000:]
    killed = run_stage("resumed", "--kill-at-layer", "1")
    assert killed.returncode == -9, killed.stdout[-3000:] + killed.stderr[-3000:]
    assert not (tmp_path / "resumed_native").exists()  # nothing half-written
    assert json.loads((tmp_path / "resumed_layers" / "manifest.json").read_text())["last_completed_layer"] == 0
    resumed = run_stage("resumed")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming layerwise calibration from layer 1" in resumed.stdout + resumed.stderr
    assert not (tmp_path / "resumed_layers").exists() and not (tmp_path / "whole_layers").exists()

    def state(name):
        model = load_model(tmp_path / f"{name}_native").model
        tensors, extra = {}, {}
        for key, value in model.state_dict().items():
            if key.endswith("_extra_state"):  # pickled quantizer settings: compared as data
                extra[key] = torch.load(io.BytesIO(value.numpy().tobytes()), weights_only=False) if torch.is_tensor(
                    value) and value.numel() else value
            elif torch.is_tensor(value):
                tensors[key] = value
        return tensors, extra

    with runtime.parallel_runtime():
        (expected, expected_extra), (got, got_extra) = state("whole"), state("resumed")
    assert sorted(got) == sorted(expected) and any(k.endswith("weight_quantizer._amax") for k in got)
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key
    assert _same_data(got_extra, expected_extra)


def _same_data(a, b) -> bool:
    """Nested dicts / lists / tensors equal, tensors bit for bit."""
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_data(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_data(x, y) for x, y in zip(a, b))
    return a == b


def test_resumable_calibration_is_refused_before_launch_where_it_cannot_run(tiny_hf_models, tmp_path, capsys):
    """One line and exit 2 before anything runs: on ModelOpt < 0.46 (the previous leg), and for a
    job of several processes on the current one."""
    import launch

    args = ["ptq_recipe", f"model_path={tiny_hf_models['llama']}", f"export_config.path={tmp_path / 'export'}",
            f"quantization_config.calibration_checkpoint_dir={tmp_path / 'layers'}"]
    if compat.resumable_layerwise_calibration():
        args, expected = args + ["calibration_tp=2"], "runs in one process, this job has 2"
    else:
        expected = "needs ModelOpt's resumable layer-wise calibration (nvidia-modelopt >= 0.46"
    code = launch.main([*args, "--yes"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and last.startswith("error: ptq_recipe: quantization_config.calibration_checkpoint_dir="), last
    assert expected in last and not (tmp_path / "export").exists()
    if compat.resumable_layerwise_calibration():
        with pytest.raises(QuantizationConfigError, match="one calibration method per run"):
            QuantizationConfig(algorithm="fp8", calibration_algorithm="max+mse",
                               calibration_checkpoint_dir="/tmp/layers")
        # ModelOpt >= 0.44's gptq max-calibrates first: the tuned max+GPTQ default is one layer-wise step
        assert QuantizationConfig(algorithm="fp8", calibration_checkpoint_dir="/tmp/layers").layerwise_methods() == [
            "gptq_lite"]
