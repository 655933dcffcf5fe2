"""One way in for every model a stage reads: a native checkpoint, a NeMo 2 checkpoint, an HF
directory, a GGUF file, or the name of a model shipped inside an installed package."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import torch

from nemo_optim import checkpoint, runtime
from nemo_optim.models import hf, nemo2
from nemo_optim.models.config import GPTModelConfig, build_gpt_model

SourceKind = Literal["native", "nemo2", "hf", "gguf"]


@dataclasses.dataclass
class ModelSource:
    kind: SourceKind
    path: Path
    """What the user gave (resolved for embedded names)."""


@dataclasses.dataclass
class LoadedModel:
    model: torch.nn.Module
    config: GPTModelConfig
    hf_dir: Path
    """HF config + tokenizer files that describe this model (used for tokenizing and export)."""
    source: ModelSource


def resolve_source(model_path: str | Path) -> ModelSource:
    """Classifies `model_path`; one clear error when it is none of the supported kinds."""
    name = str(model_path)
    if name in hf.EMBEDDED_MODELS:
        return ModelSource("gguf", hf.embedded_model_path(name))
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource("gguf", path)
    if path.is_dir() and checkpoint.is_checkpoint(path):
        return ModelSource("native", path)
    if path.is_dir() and nemo2.is_nemo2_checkpoint(path):
        return ModelSource("nemo2", path)
    if path.is_dir() and (path / "config.json").is_file():
        return ModelSource("hf", path)
    found = ("a file" if path.is_file() else "a directory without config.json or manifest.json" if path.is_dir()
             else "nothing")
    raise hf.ModelSourceError(
        f"model path {name!r}: found {found}; give a nemo-optim checkpoint directory, a NeMo 2 "
        f"checkpoint directory, a Hugging Face model directory, a .gguf file, or one of the embedded models: "
        f"{', '.join(hf.EMBEDDED_MODELS)}. Hub ids are not downloaded."
    )


def read_model_config(model_path: str | Path, dtype: str | None = None) -> tuple[GPTModelConfig, Path, ModelSource]:
    """The config and HF metadata dir of `model_path`, without building the model."""
    source = resolve_source(model_path)
    if source.kind == "native":
        info = checkpoint.read_checkpoint_info(source.path)
        config = info.model_config
        if dtype is not None:
            config = dataclasses.replace(config, dtype=dtype)
        return config, info.hf_dir, source
    if source.kind == "nemo2":
        where = source.path / nemo2.CONTEXT_DIR / nemo2.MODEL_YAML
        config = nemo2.config_from_model_yaml(nemo2.read_model_yaml(source.path), where, dtype=dtype or "float32")
        return config, nemo2.hf_metadata_dir(source.path), source
    hf_dir = hf.gguf_to_hf(source.path) if source.kind == "gguf" else source.path
    config = hf.config_from_hf(hf_dir, dtype=dtype or "float32")
    hf.check_tokenizer_files(hf_dir)  # before minutes of loading, not after
    return config, hf_dir, source


def load_model(
    model_path: str | Path,
    dtype: str | None = None,
    transformer_impl: str | None = None,
) -> LoadedModel:
    """Builds this rank's shard of the model at `model_path` and loads its weights.

    Needs `runtime.parallel_runtime`; TP/PP come from megatron's parallel_state.
    """
    config, hf_dir, source = read_model_config(model_path, dtype)
    if transformer_impl is not None:
        config = dataclasses.replace(config, transformer_impl=transformer_impl)
    model = build_gpt_model(config, initialize=False)  # every weight is loaded below
    if source.kind == "native":
        model = checkpoint.load_checkpoint_weights(model, checkpoint.read_checkpoint_info(source.path))
    elif source.kind == "nemo2":
        model = nemo2.load_nemo2_weights(model, source.path)
    else:
        hf.import_hf_weights(model, hf_dir, config)
    _sync_tied_output_layer(model)
    runtime.barrier()
    return LoadedModel(model=model, config=config, hf_dir=hf_dir, source=source)


def _sync_tied_output_layer(model: torch.nn.Module) -> None:
    """At PP>1 a tied output layer is a copy of the word embeddings living on the last stage;
    importers only fill the first stage's copy. Copy it over (megatron's own scheme: zero the
    copy, all-reduce over the embedding group)."""
    from megatron.core import parallel_state

    if (parallel_state.get_pipeline_model_parallel_world_size() == 1
            or not getattr(model, "share_embeddings_and_output_weights", False)
            or not parallel_state.is_rank_in_embedding_group()):
        return
    weight = model.shared_embedding_or_output_weight()
    with torch.no_grad():
        if not parallel_state.is_pipeline_first_stage():
            weight.zero_()
        torch.distributed.all_reduce(weight.data, group=parallel_state.get_embedding_group())


def load_tokenizer(hf_dir: str | Path):
    """The tokenizer stored with a model (HF files in the model or checkpoint `hf/` dir)."""
    import transformers

    hf.check_tokenizer_files(hf_dir)
    try:
        return transformers.AutoTokenizer.from_pretrained(str(hf_dir))
    except (OSError, ValueError, AttributeError, TypeError) as error:
        raise hf.ModelSourceError(
            f"{hf_dir}: its tokenizer files cannot be loaded ({type(error).__name__}: {error}); copy the model's "
            f"tokenizer files (tokenizer.json, tokenizer_config.json, ...) into this directory again."
        ) from None
