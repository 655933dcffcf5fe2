"""The compressed-tensors export (vLLM's own quantized checkpoint format), written from the
quantizers ModelOpt calibrated: the codes are those of ModelOpt's fake-quantized weights and the
scales its amax values, nothing is calibrated again. The `compressed-tensors` library writes the
tensors and the config; the layout around them (names, embeddings, norms, tokenizer) comes from
ModelOpt's unquantized HF export of the same model.

Input scales that ModelOpt multiplies activations by (SmoothQuant, AWQ: `pre_quant_scale`) have no
field in compressed-tensors: they are folded where that is exact - into the norm before QKV and
fc1, into the up-projection rows before fc2 and into the value rows before the attention output
projection (only when every head has its own KV group).
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from nemo_optim.quantization.config import QuantizationConfig, QuantizationConfigError

MAX_BOUND = {8: 127.0, 4: 7.0, (4, 3): 448.0}

# algorithm -> (weights, input activations, compressed-tensors format); each side:
# (type, bits, strategy, dynamic)
SCHEMES: dict[str, tuple[tuple, tuple | None, str]] = {
    "int8": (("int", 8, "channel", False), ("int", 8, "tensor", False), "int-quantized"),
    "int8_sq": (("int", 8, "channel", False), ("int", 8, "tensor", False), "int-quantized"),
    "fp8": (("float", 8, "tensor", False), ("float", 8, "tensor", False), "float-quantized"),
    "fp8_pc_pt": (("float", 8, "channel", False), ("float", 8, "token", True), "float-quantized"),
    "int8_wo": (("int", 8, "channel", False), None, "pack-quantized"),
    "int4": (("int", 4, "group", False), None, "pack-quantized"),
    "int4_awq": (("int", 4, "group", False), None, "pack-quantized"),
}
# algorithm -> why compressed-tensors cannot express it
NO_EQUIVALENT = {
    "w4a8_awq": "its weights are scaled twice (INT4 blocks, then FP8 per tensor) and its activations are static "
                "per-tensor FP8; compressed-tensors' W4A8 schemes have one weight scale and dynamic activations",
    "block_fp8": "its 2D weight blocks are not exported from ModelOpt's megatron quantizers here",
    "nvfp4": "NVFP4 needs a GPU to calibrate and its two-level scales are not mapped here",
}
LINEARS = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")


def check_algorithm(config: QuantizationConfig) -> None:
    """Refuses, before calibrating, a ModelOpt config this export cannot write."""
    field = "export_config.export_format='compressed_tensors'"
    if config.custom_config_path or config.auto_quantize_bits is not None:
        raise QuantizationConfigError(
            f"{field} maps nemo-optim's named algorithms ({', '.join(SCHEMES)}) only, not a custom config or "
            f"auto_quantize's per-layer mix; use export_format=hf or trtllm.")
    if config.algorithm is not None and config.algorithm not in SCHEMES:
        reason = NO_EQUIVALENT.get(config.algorithm, "it has no compressed-tensors scheme")
        raise QuantizationConfigError(
            f"quantization_config.algorithm={config.algorithm!r} cannot be written with {field}: {reason}; "
            f"choose one of {', '.join(SCHEMES)} or export_format=hf/trtllm.")
    if config.enable_kv_cache:
        raise QuantizationConfigError(
            f"quantization_config.enable_kv_cache=True with {field}: KV-cache scales are not written to "
            f"compressed-tensors here; set enable_kv_cache=False.")


def check_foldable(config: QuantizationConfig, num_attention_heads: int, num_query_groups: int) -> None:
    """SmoothQuant/AWQ scale the attention output projection's inputs; those scales fold into the
    value rows only when each head has its own KV group. Refused before calibrating otherwise."""
    from nemo_optim.quantization.config import PRESET_METHODS

    methods = [PRESET_METHODS.get(config.algorithm or "", "max") if m == "preset" else m
               for m in config.calibration_methods()]
    scaling = [m for m in methods if m in ("smoothquant", "awq_lite", "awq_clip", "awq_full")]
    excluded = any("linear_proj" in pattern for pattern in config.exclude_modules)
    if scaling and num_query_groups != num_attention_heads and not excluded:
        raise QuantizationConfigError(
            f"quantization_config.algorithm={config.algorithm!r} ({scaling[0]}) with "
            f"export_config.export_format='compressed_tensors': its input scales of the attention output "
            f"projection cannot be folded into the value rows ({num_attention_heads} heads share "
            f"{num_query_groups} KV groups) and compressed-tensors has no field for them; add '*linear_proj*' to "
            f"quantization_config.exclude_modules (that projection stays unquantized), or export with trtllm.")


def _quantizer_scale(quantizer, rows: int) -> torch.Tensor:
    """ModelOpt's amax as the scale compressed-tensors multiplies codes by, shaped per strategy:
    [1] per tensor, [rows, 1] per channel, [rows, groups] per block."""
    amax = quantizer.amax.detach().float()
    scale = amax / MAX_BOUND[quantizer.num_bits]
    if scale.numel() == 1:
        return scale.reshape(1)
    return scale.reshape(rows, -1)


def _split_rows(name: str, tensor: torch.Tensor, model_config) -> dict[str, torch.Tensor]:
    """A megatron fused weight's rows (or a per-row scale) as the HF projections they stand for:
    QKV interleaved per KV group, fc1 as [gate; up]."""
    if name == "self_attention.linear_qkv":
        groups, heads = model_config.num_query_groups, model_config.num_attention_heads
        head_dim = model_config.kv_channels
        per_group = heads // groups
        grouped = tensor.reshape(groups, (per_group + 2) * head_dim, *tensor.shape[1:])
        q, k, v = grouped.split([per_group * head_dim, head_dim, head_dim], dim=1)
        rest = tensor.shape[1:]
        return {"self_attn.q_proj": q.reshape(-1, *rest), "self_attn.k_proj": k.reshape(-1, *rest),
                "self_attn.v_proj": v.reshape(-1, *rest)}
    if name == "mlp.linear_fc1":
        if not model_config.gated_linear_unit:
            return {"mlp.up_proj": tensor}
        gate, up = tensor.chunk(2, dim=0)
        return {"mlp.gate_proj": gate, "mlp.up_proj": up}
    return {{"self_attention.linear_proj": "self_attn.o_proj", "mlp.linear_fc2": "mlp.down_proj"}[name]: tensor}


def _kv_head_of_each_head(model_config) -> torch.Tensor:
    per_group = model_config.num_attention_heads // model_config.num_query_groups
    return torch.arange(model_config.num_attention_heads) // per_group


@contextlib.contextmanager
def _quantizers_disabled(model: torch.nn.Module) -> Iterator[None]:
    from modelopt.torch.quantization.nn import TensorQuantizer

    enabled = [m for m in model.modules() if isinstance(m, TensorQuantizer) and m.is_enabled]
    for quantizer in enabled:
        quantizer.disable()
    try:
        yield
    finally:
        for quantizer in enabled:
            quantizer.enable()


def quantized_tensors(model: torch.nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """HF module name -> {"weight": ModelOpt's fake-quantized weight (fp32), "weight_scale",
    "input_scale" (static activations)} with input pre-quant scales folded (see module doc), plus
    HF norm name -> {"fold": the factor its weight is multiplied by}."""
    config = model.config
    result: dict[str, dict[str, torch.Tensor]] = {}
    for index, layer in enumerate(model.decoder.layers):
        prefix = f"model.layers.{index}."  # (the whole model is in this process: TP = PP = 1)
        folds: dict[str, torch.Tensor] = {}
        for name in LINEARS:
            module = layer.get_submodule(name)
            if not module.weight_quantizer.is_enabled:
                continue
            rows = module.weight.shape[0]
            with torch.no_grad():
                fake = module.weight_quantizer(module.weight.detach().float()).float()
            tensors = {"weight": fake, "weight_scale": _quantizer_scale(module.weight_quantizer, rows)}
            if module.input_quantizer.is_enabled and not getattr(module.input_quantizer, "_dynamic", False) \
                    and module.input_quantizer.amax is not None and module.input_quantizer.amax.numel() == 1:
                tensors["input_scale"] = _quantizer_scale(module.input_quantizer, 1)
            pre = getattr(module.input_quantizer, "pre_quant_scale", None)
            if pre is not None:
                folds[name] = pre.detach().float().reshape(-1)
            for hf_name, part in _split_rows(name, tensors["weight"], config).items():
                entry = {"weight": part}
                scale = tensors["weight_scale"]
                entry["weight_scale"] = scale if scale.shape[0] == 1 and scale.numel() == 1 else \
                    _split_rows(name, scale, config)[hf_name]
                if "input_scale" in tensors:
                    entry["input_scale"] = tensors["input_scale"]
                result[prefix + hf_name] = entry
        _fold(result, folds, prefix, config)
    return result


def _fold(result: dict, folds: dict[str, torch.Tensor], prefix: str, config) -> None:
    """Moves each pre-quant scale to the tensor before it (exact up to float rounding: a
    per-row weight scale absorbs it, the codes stay)."""
    def scale_rows(hf_name: str, factor: torch.Tensor) -> None:
        entry = result[prefix + hf_name]
        entry["weight"] = entry["weight"] * factor[:, None]
        if entry["weight_scale"].numel() == 1:
            raise QuantizationConfigError(
                f"{prefix + hf_name}: a per-tensor weight scale cannot absorb per-row input scales")
        entry["weight_scale"] = entry["weight_scale"] * factor[:, None]
        entry.setdefault("row_fold", torch.ones_like(factor))
        entry["row_fold"] = entry["row_fold"] * factor

    if "self_attention.linear_qkv" in folds:
        result[prefix + "input_layernorm"] = {"fold": folds["self_attention.linear_qkv"]}
    if "mlp.linear_fc1" in folds:
        result[prefix + "post_attention_layernorm"] = {"fold": folds["mlp.linear_fc1"]}
    if "mlp.linear_fc2" in folds:
        scale_rows("mlp.up_proj", folds["mlp.linear_fc2"])
    if "self_attention.linear_proj" in folds:
        head_dim = config.kv_channels
        per_head = folds["self_attention.linear_proj"].reshape(config.num_attention_heads, head_dim)
        kv_head = _kv_head_of_each_head(config)
        per_kv = torch.stack([per_head[kv_head == g][0] for g in range(config.num_query_groups)])
        if not torch.equal(per_kv[kv_head], per_head):
            raise QuantizationConfigError(
                f"{prefix}self_attn.o_proj: its pre-quant scales differ between heads that share a KV group; "
                f"exclude '*linear_proj*' from quantization for export_format=compressed_tensors.")
        scale_rows("self_attn.v_proj", per_kv.reshape(-1))


def _args(side: tuple | None, group_size: int):
    from compressed_tensors.quantization import QuantizationArgs

    if side is None:
        return None
    kind, bits, strategy, dynamic = side
    return QuantizationArgs(num_bits=bits, type=kind, symmetric=True, strategy=strategy, dynamic=dynamic,
                            group_size=group_size if strategy == "group" else None)


def scheme_config(algorithm: str, group_size: int, ignore: list[str]):
    """The compressed-tensors QuantizationConfig of `algorithm` (SCHEMES)."""
    from compressed_tensors.quantization import QuantizationConfig as CTConfig
    from compressed_tensors.quantization import QuantizationScheme, QuantizationStatus

    weights, inputs, fmt = SCHEMES[algorithm]
    scheme = QuantizationScheme(targets=["Linear"], weights=_args(weights, group_size),
                                input_activations=_args(inputs, group_size), format=fmt)
    return CTConfig(config_groups={"group_0": scheme}, format=fmt, ignore=ignore,
                    quantization_status=QuantizationStatus.COMPRESSED)


def write_compressed_tensors(model: torch.nn.Module, config: QuantizationConfig, source_hf_dir: Path,
                             directory: Path, dtype: torch.dtype) -> None:
    """Writes `model` (quantized with `config.algorithm`) as a compressed-tensors checkpoint."""
    from compressed_tensors.compressors import BaseCompressor, ModelCompressor
    from safetensors.torch import load_file, save_file

    from nemo_optim.models.hf import write_hf_export

    quantized = quantized_tensors(model)
    with tempfile.TemporaryDirectory(prefix="dense_export_") as dense_dir, _quantizers_disabled(model):
        write_hf_export(model, source_hf_dir, dense_dir, torch.float32)
        dense = {}
        for file in sorted(Path(dense_dir).glob("*.safetensors")):
            dense.update(load_file(file))
        for path in Path(dense_dir).iterdir():
            metadata = path.is_file() and not path.name.endswith(".safetensors")
            if metadata and path.name not in ("model.safetensors.index.json", "hf_quant_config.json"):
                (Path(directory) / path.name).write_bytes(path.read_bytes())
    _check_layout(model, dense)
    ignore = sorted({name.rsplit(".", 1)[0] for name in dense if name.endswith("proj.weight")
                     and name.rsplit(".", 1)[0] not in quantized})
    ignore.append("lm_head")
    ct_config = scheme_config(config.algorithm, config.awq_block_size, ignore)
    scheme = ct_config.config_groups["group_0"]
    compressor = BaseCompressor.get_value_from_registry(ct_config.format)
    out = {}
    for name, tensor in dense.items():
        module = name.rsplit(".", 1)[0]
        entry = quantized.get(module)
        if entry is None:
            out[name] = tensor.to(dtype)
        elif "fold" in entry:  # a norm that absorbs the next linear's input scales
            out[name] = (tensor.float() * entry["fold"]).to(dtype)
        elif name.endswith(".weight"):
            local = {k: entry[k] for k in ("weight", "weight_scale", "input_scale") if k in entry}
            for key, value in compressor.compress(local, scheme).items():
                out[f"{module}.{key}"] = value.contiguous().clone()  # (q/k/v share one input scale tensor)
        else:  # a bias beside a quantized weight: scaled with its rows
            out[name] = (tensor.float() * entry.get("row_fold", 1.0)).to(dtype)
    save_file(out, str(Path(directory) / "model.safetensors"), metadata={"format": "pt"})
    hf_config = json.loads((Path(directory) / "config.json").read_text())
    hf_config.pop("quantization_config", None)
    hf_config["torch_dtype"] = hf_config["dtype"] = str(dtype).removeprefix("torch.")
    (Path(directory) / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    ModelCompressor(quantization_config=ct_config).update_config(str(directory))


def _check_layout(model: torch.nn.Module, dense: dict[str, torch.Tensor]) -> None:
    """The row split used for the quantized weights must give ModelOpt's own HF layout: the raw
    weights split here equal the unquantized export's tensors (a layout error fails the export)."""
    from nemo_optim.quantization.quantizer import ExportVerificationError

    for index, layer in enumerate(model.decoder.layers):
        for name in LINEARS:
            weight = layer.get_submodule(name).weight.detach().float()
            for hf_name, part in _split_rows(name, weight, model.config).items():
                key = f"model.layers.{index}.{hf_name}.weight"
                if key not in dense or not torch.equal(dense[key].float(), part):
                    raise ExportVerificationError(
                        f"compressed-tensors export: {key} does not match ModelOpt's HF layout of {name}; the export "
                        f"would serve wrong weights.")


def dequantized_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """Module name -> weight as compressed-tensors decompresses it from the checkpoint (fp32)."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig as CTConfig
    from safetensors.torch import load_file

    config = CTConfig.model_validate(json.loads((Path(directory) / "config.json").read_text())["quantization_config"])
    tensors = {}
    for file in Path(directory).glob("*.safetensors"):
        tensors.update(load_file(file))
    modules = sorted({k.rsplit(".", 1)[0] for k in tensors if k.endswith(("weight_packed", "weight_scale"))})
    result = {}
    for scheme in config.config_groups.values():
        compressor = BaseCompressor.get_value_from_registry(scheme.format or config.format)
        for module in modules:
            local = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == module}
            result[module] = compressor.decompress(local, scheme)["weight"].float()
    return result
