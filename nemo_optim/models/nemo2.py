"""NeMo 2 checkpoints (what NeMo 2's `llm.import_ckpt`, `llm.prune`, `llm.distill`, `llm.ptq` and
training wrote), read without nemo_toolkit.

Layout, as NeMo 2 defines it (nemo/lightning/ckpt_utils.py: WEIGHTS_PATH / CONTEXT_PATH;
nemo/lightning/io/mixin.py: `IOMixin.io_dump` writes context/io.json and context/model.yaml;
nemo/lightning/io/pl.py: MegatronCheckpointIO saves the weights with megatron dist-checkpointing):

    <checkpoint>/context/model.yaml      the model and its config, every field, as YAML data
    <checkpoint>/context/io.json         the same as a fiddle graph (not read: it names code)
    <checkpoint>/context/nemo_tokenizer/ the HF tokenizer files (AutoTokenizer artifact)
    <checkpoint>/weights/                megatron dist-checkpoint, keys `module.<mcore name>`

model.yaml is read with `yaml.safe_load` as plain data: nothing from the checkpoint is unpickled
or executed. Its `_target_` names are checked against a list, never imported. NeMo 2 saves
Transformer Engine layer names (`linear_qkv.layer_norm_weight`, `linear_fc1.layer_norm_weight`);
megatron's local spec already saves and loads its norms under those names (its
`sharded_state_dict_keys_map`), so only NeMo's `module.` prefix differs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from nemo_optim.models import hf, sharded
from nemo_optim.models.config import GPTModelConfig

CONTEXT_DIR, WEIGHTS_DIR, MODEL_YAML = "context", "weights", "model.yaml"
TOKENIZER_TARGET = "nemo.collections.common.tokenizers.huggingface.auto_tokenizer.AutoTokenizer"

# NeMo 2 model class -> the HF architecture nemo-optim builds and exports it as
MODEL_CLASSES = {
    "nemo.collections.llm.gpt.model.llama.LlamaModel": "LlamaForCausalLM",
    "nemo.collections.llm.gpt.model.mistral.MistralModel": "LlamaForCausalLM",  # without a sliding window
    "nemo.collections.llm.gpt.model.base.GPTModel": "LlamaForCausalLM",
    "nemo.collections.llm.gpt.model.qwen2.Qwen2Model": "Qwen2ForCausalLM",
    "nemo.collections.llm.gpt.model.qwen3.Qwen3Model": "Qwen3ForCausalLM",
}
# config fields that change the math, and the only value nemo-optim's models compute with;
# every other field of model.yaml is parallelism, fusion, precision or training bookkeeping
REQUIRED_VALUES = {
    "num_moe_experts": None,            # MoE
    "is_hybrid_model": False,           # Mamba hybrids
    "multi_latent_attention": False,    # DeepSeek MLA
    "position_embedding_type": "rope",
    "rotary_percent": 1.0,
    "rotary_interleaved": False,
    "gated_linear_unit": True,
    "add_bias_linear": False,
    "layernorm_zero_centered_gamma": False,
    "apply_residual_connection_post_layernorm": False,
    "window_size": None,                # sliding-window attention
    "softmax_scale": None,
    "seq_len_interpolation_factor": None,
    "mtp_num_layers": None,
    "mrope_section": None,
    "no_rope_freq": None,
}
SILU = "torch.nn.functional.silu"
# NeMo 2's Llama 3.1 / 3.2 RoPE scaling (nemo/collections/llm/gpt/model/llama.py: Llama31Config)
LLAMA31_ROPE_DEFAULTS = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "old_context_len": 8192}


class Nemo2CheckpointError(hf.ModelSourceError):
    """A NeMo 2 checkpoint nemo-optim cannot read, naming the field and what to do."""


def is_nemo2_checkpoint(path: str | Path) -> bool:
    path = Path(path)
    return (path / CONTEXT_DIR / MODEL_YAML).is_file() and (path / WEIGHTS_DIR).is_dir()


def read_model_yaml(path: str | Path) -> dict:
    import yaml

    model_yaml = Path(path) / CONTEXT_DIR / MODEL_YAML
    try:
        data = yaml.safe_load(model_yaml.read_text())
    except yaml.YAMLError as error:
        raise Nemo2CheckpointError(
            f"{model_yaml}: not valid YAML ({error}); restore it from the checkpoint's source.") from None
    if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
        raise Nemo2CheckpointError(f"{model_yaml}: no `config` section; is this a NeMo 2 GPT checkpoint?")
    return data


def _target(value) -> str | None:
    return value.get("_target_") if isinstance(value, dict) else None


def config_from_model_yaml(data: dict, where: Path, dtype: str = "float32") -> GPTModelConfig:
    """The `GPTModelConfig` of a NeMo 2 GPT model.yaml; one error listing every field that
    nemo-optim cannot compute with."""
    model_class, config = data.get("_target_"), data["config"]
    if model_class not in MODEL_CLASSES:
        raise Nemo2CheckpointError(
            f"{where}: model _target_={model_class!r} is not supported; supported: {', '.join(MODEL_CLASSES)}.")
    problems = [f"config.{name}={config[name]!r} (needs {required!r})"
                for name, required in REQUIRED_VALUES.items() if name in config and config[name] != required]
    if _target(config.get("activation_func")) not in (None, SILU):
        problems.append(f"config.activation_func={_target(config['activation_func'])!r} (needs {SILU})")
    if config.get("normalization", "RMSNorm") not in ("RMSNorm", "LayerNorm"):
        problems.append(f"config.normalization={config['normalization']!r} (needs RMSNorm or LayerNorm)")
    rope_scaling_factor = None
    if config.get("scale_factor") is not None:  # Llama 3.1 / 3.2 configs
        differs = {k: config.get(k) for k, v in LLAMA31_ROPE_DEFAULTS.items() if config.get(k, v) != v}
        if differs:
            problems.append(f"config RoPE scaling {differs} (needs {LLAMA31_ROPE_DEFAULTS})")
        rope_scaling_factor = float(config["scale_factor"])
    if not isinstance(config.get("vocab_size"), int):
        problems.append(f"config.vocab_size={config.get('vocab_size')!r} (needs the padded vocabulary size)")
    if problems:
        raise Nemo2CheckpointError(f"{where}: not supported by nemo-optim: " + "; ".join(problems) + ".")
    heads = config["num_attention_heads"]
    return GPTModelConfig(
        num_layers=config["num_layers"],
        hidden_size=config["hidden_size"],
        ffn_hidden_size=config["ffn_hidden_size"],
        num_attention_heads=heads,
        num_query_groups=config.get("num_query_groups") or heads,
        kv_channels=config.get("kv_channels") or config["hidden_size"] // heads,
        vocab_size=config["vocab_size"],
        normalization=config.get("normalization", "RMSNorm"),
        layernorm_epsilon=float(config.get("layernorm_epsilon", 1e-5)),
        rotary_base=float(config.get("rotary_base", 10000.0)),
        rope_scaling_factor=rope_scaling_factor,
        max_position_embeddings=int(config.get("seq_length") or 2048),
        tie_word_embeddings=bool(config.get("share_embeddings_and_output_weights", False)),
        add_qkv_bias=bool(config.get("add_qkv_bias", False)),
        qk_layernorm=bool(config.get("qk_layernorm", False)),
        dtype=dtype,
        hf_architecture=MODEL_CLASSES[model_class],
    )


def _tokenizer_dir(path: Path, data: dict) -> Path:
    tokenizer = data.get("tokenizer")
    where = path / CONTEXT_DIR / MODEL_YAML
    if _target(tokenizer) != TOKENIZER_TARGET:
        raise Nemo2CheckpointError(
            f"{where}: tokenizer _target_={_target(tokenizer)!r}: only NeMo's Hugging Face AutoTokenizer is read "
            f"(SentencePiece and others are not); convert the checkpoint's tokenizer to HF files first.")
    name = str(tokenizer.get("pretrained_model_name") or "")
    directory = path / CONTEXT_DIR / name if name and not Path(name).is_absolute() else Path(name)
    if not hf.has_tokenizer_files(directory):
        raise Nemo2CheckpointError(
            f"{where}: tokenizer pretrained_model_name={name!r} is not a directory of tokenizer files inside the "
            f"checkpoint's context/; NeMo 2 copies them there (context/nemo_tokenizer) - copy them in.")
    return directory


def hf_metadata_dir(path: str | Path) -> Path:
    """An HF directory (config.json from model.yaml, the checkpoint's tokenizer files, its
    generation config) describing the NeMo 2 model at `path`, made once per context and cached:
    what tokenizing and HF export read."""
    from nemo_optim import runtime
    from nemo_optim.checkpoint import atomic_directory, directory_digest

    path = Path(path)
    data = read_model_yaml(path)
    config = config_from_model_yaml(data, path / CONTEXT_DIR / MODEL_YAML)
    tokenizer_dir = _tokenizer_dir(path, data)
    target = hf.cache_dir() / "nemo2" / f"{path.name}-{directory_digest(path / CONTEXT_DIR)[:16]}"
    if not (target / "config.json").is_file() and runtime.is_main_process():
        with atomic_directory(target, collective=False) as tmp_dir:
            for file in tokenizer_dir.iterdir():
                if file.is_file():
                    shutil.copy2(file, tmp_dir / file.name)
            generation = path / CONTEXT_DIR / "artifacts" / "generation_config.json"
            if generation.is_file():
                shutil.copy2(generation, tmp_dir / generation.name)
            hf_config = hf.hf_config_dict(config) | _special_token_ids(tmp_dir)
            (tmp_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    runtime.barrier()
    return target


def _special_token_ids(tokenizer_dir: Path) -> dict:
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}


# NeMo 2's MegatronStrategy wraps the model: every key starts with `module.`
PREFIX = "module."


def nemo2_sharded_state_dict(model: torch.nn.Module) -> dict:
    """This rank's sharded state dict under NeMo 2's keys (no `_extra_state`: NeMo 2's are TE's)."""
    return {name: item for name, item in sharded.sharded_state_dict(model, prefix=PREFIX).items()
            if not name.endswith("_extra_state")}


def load_nemo2_weights(model: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """Loads a NeMo 2 checkpoint's weights into this rank's shard of `model` (any TP/PP)."""
    from megatron.core import dist_checkpointing

    weights = Path(path) / WEIGHTS_DIR
    sharded = nemo2_sharded_state_dict(model)
    try:
        loaded = dist_checkpointing.load(sharded, str(weights))
    except Exception as error:  # noqa: BLE001 - torch/megatron raise several types for a mismatch
        raise Nemo2CheckpointError(
            f"{weights}: the weights do not fit the model described by context/model.yaml "
            f"({type(error).__name__}: {str(error).splitlines()[0][:300]}).") from None
    # the common part of the checkpoint (Lightning's epoch, loops, ...) comes back too
    state_dict = {name.removeprefix(PREFIX): value for name, value in loaded.items() if name in sharded}
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise Nemo2CheckpointError(f"{weights}: missing {missing[:5]}, unexpected {unexpected[:5]}.")
    return model


# ---- writing: a nemo-optim model as a NeMo 2 checkpoint directory ----

# HF architecture -> the NeMo 2 model and config classes it is written as (NeMo 2's own HF
# importers pick the same: nemo/collections/llm/gpt/model/{llama,qwen2,qwen3}.py)
NEMO2_CLASSES = {
    "LlamaForCausalLM": ("nemo.collections.llm.gpt.model.llama.LlamaModel",
                         "nemo.collections.llm.gpt.model.llama.LlamaConfig"),
    "Qwen2ForCausalLM": ("nemo.collections.llm.gpt.model.qwen2.Qwen2Model",
                         "nemo.collections.llm.gpt.model.qwen2.Qwen2Config"),
    "Qwen3ForCausalLM": ("nemo.collections.llm.gpt.model.qwen3.Qwen3Model",
                         "nemo.collections.llm.gpt.model.qwen3.Qwen3Config"),
}
LLAMA31_CONFIG = "nemo.collections.llm.gpt.model.llama.Llama31Config"
TRAINER_CONTEXT = "nemo.lightning.io.pl.TrainerContext"
TRAINER = "nemo.lightning.pytorch.trainer.Trainer"
TOKENIZER_DIR = "nemo_tokenizer"  # where NeMo 2's AutoTokenizer artifact keeps the files, under context/
IO_JSON = "io.json"


def nemo2_context(config: GPTModelConfig):
    """NeMo 2's TrainerContext for `config` (model config, HF tokenizer artifact, a default
    trainer), as a fiddle_json tree. Every field that changes the math is written explicitly, so
    NeMo's class defaults do not matter."""
    from nemo_optim.models.fiddle_json import Call, ClassRef

    if config.hf_architecture not in NEMO2_CLASSES:
        raise Nemo2CheckpointError(
            f"hf_architecture={config.hf_architecture!r} has no NeMo 2 model class here; supported: "
            f"{', '.join(NEMO2_CLASSES)}.")
    model_class, config_class = NEMO2_CLASSES[config.hf_architecture]
    dtype = ClassRef(f"torch.{config.dtype}")
    arguments = {
        "num_layers": config.num_layers,
        "hidden_size": config.hidden_size,
        "ffn_hidden_size": config.ffn_hidden_size,
        "num_attention_heads": config.num_attention_heads,
        "num_query_groups": config.num_query_groups,
        "kv_channels": config.kv_channels,
        "vocab_size": config.vocab_size,
        "seq_length": config.max_position_embeddings,
        "normalization": config.normalization,
        "layernorm_epsilon": config.layernorm_epsilon,
        "rotary_base": config.rotary_base,
        "share_embeddings_and_output_weights": config.tie_word_embeddings,
        "add_qkv_bias": config.add_qkv_bias,
        "qk_layernorm": config.qk_layernorm,
        "add_bias_linear": False,
        "gated_linear_unit": True,
        "activation_func": ClassRef(SILU),
        "position_embedding_type": "rope",
        "params_dtype": dtype,
        "pipeline_dtype": dtype,
        "bf16": config.dtype == "bfloat16",
        "fp16": config.dtype == "float16",
    }
    if config.rope_scaling_factor is not None:
        if config.hf_architecture != "LlamaForCausalLM":
            raise Nemo2CheckpointError(f"rope_scaling_factor={config.rope_scaling_factor}: NeMo 2 has Llama 3.1 "
                                       f"RoPE scaling only, not for {config.hf_architecture}.")
        config_class = LLAMA31_CONFIG
        arguments |= {"scale_factor": config.rope_scaling_factor, **LLAMA31_ROPE_DEFAULTS}
    model = Call(model_class, {
        "config": Call(config_class, arguments),
        "tokenizer": Call(TOKENIZER_TARGET, {"pretrained_model_name": TOKENIZER_DIR}),
    })
    return Call(TRAINER_CONTEXT, {"model": model, "trainer": Call(TRAINER, {}), "extra": {}})


def write_nemo2_checkpoint(model: torch.nn.Module, config: GPTModelConfig, path: str | Path,
                           source_hf_dir: str | Path) -> Path:
    """Writes `model` (collective: every rank calls it) as a NeMo 2 checkpoint directory:
    context/io.json + model.yaml + nemo_tokenizer/ (+ artifacts/generation_config.json) and the
    weights as a megatron dist-checkpoint under NeMo's `module.` keys. Atomic."""
    import yaml

    from nemo_optim import compat, runtime
    from nemo_optim.checkpoint import (
        HF_TOKENIZER_FILES,
        atomic_directory,
        fork_writer_results_queue,
        save_dist_checkpoint,
    )
    from nemo_optim.models.fiddle_json import as_yaml_data, serialize

    context = nemo2_context(config)
    source_hf_dir = Path(source_hf_dir)
    with atomic_directory(path) as tmp:
        if runtime.is_main_process():
            (tmp / WEIGHTS_DIR).mkdir()
            context_dir = tmp / CONTEXT_DIR
            (context_dir / TOKENIZER_DIR).mkdir(parents=True)
            (context_dir / IO_JSON).write_text(json.dumps(serialize(context)))
            (context_dir / MODEL_YAML).write_text(
                yaml.safe_dump(as_yaml_data(context.arguments["model"]), sort_keys=False))
            for name in HF_TOKENIZER_FILES:
                if (source_hf_dir / name).is_file():
                    shutil.copy2(source_hf_dir / name, context_dir / TOKENIZER_DIR / name)
            compat.tokenizer_readable_by_transformers4(context_dir / TOKENIZER_DIR)  # NeMo 2.7 runs transformers 4
            if (source_hf_dir / "generation_config.json").is_file():
                (context_dir / "artifacts").mkdir()
                shutil.copy2(source_hf_dir / "generation_config.json", context_dir / "artifacts")
        runtime.barrier()
        fork_writer_results_queue()
        # with the `_extra_state` entries: NeMo's loaders ask for those of its layers
        save_dist_checkpoint(sharded.sharded_state_dict(model, prefix=PREFIX), tmp / WEIGHTS_DIR)
    return Path(path)
