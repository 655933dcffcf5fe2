"""The base model as a Hugging Face transformers model, ModelOpt's draft heads on it, and the
speculative checkpoint (draft weights + ModelOpt state) and deployment export.

The draft is trained and run on the transformers form of the base model: ModelOpt 0.43's
megatron EAGLE module builds its layers from Transformer Engine (GPU only), while its
transformers EAGLE-3 / EAGLE-1 / Medusa plugins run anywhere and keep a KV cache for the draft.
Every model source the other stages take is accepted; a native (megatron) checkpoint is
exported to HF once, through ModelOpt's exporter, and cached by its content digest.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from pathlib import Path
from typing import Any

import torch

from nemo_optim import checkpoint, runtime
from nemo_optim.models import hf
from nemo_optim.speculative.config import SpeculativeConfig, SpeculativeConfigError

FORMAT = "nemo-optim-speculative"
FORMAT_VERSION = 1
DRAFT_WEIGHTS = "draft.safetensors"
MODELOPT_STATE = "modelopt_state.pt"
DRAFT_PREFIXES = ("eagle_module.", "medusa_heads.")
EAGLE3_FEATURE_PRENORM = "eagle_module.layers.0.input_layernorm.weight"
"""EAGLE-3: kept at its initial ones, never trained. ModelOpt's EAGLE-3 layer normalizes the embeddings
with it and then, as an ordinary decoder layer, also the fused base features before its own
`hidden_norm`: hidden_norm(input_layernorm(h)). EAGLE's reference layer, vLLM and SGLang apply
hidden_norm(h) only. With a weight of ones the first norm is undone by the second (RMSNorm is
scale invariant; what remains is eps, ~1e-6 relative), so the trained draft is the draft engines
run; on the embeddings a per-channel scale would be absorbed by q/k/v_proj anyway."""


@dataclasses.dataclass
class SpeculativeModel:
    model: torch.nn.Module
    """The transformers base model converted by ModelOpt (draft heads attached)."""
    config: SpeculativeConfig
    base_hf_dir: Path
    """HF config + tokenizer (+ weights) of the base model."""


def is_speculative_checkpoint(path: str | Path) -> bool:
    manifest = Path(path) / checkpoint.MANIFEST
    return manifest.is_file() and json.loads(manifest.read_text()).get("format") == FORMAT


def base_hf_directory(model_path: str | Path) -> Path:
    """An HF directory with the weights of `model_path` (any source the other stages take)."""
    from nemo_optim.models.loader import resolve_source

    if is_speculative_checkpoint(model_path):
        raise SpeculativeConfigError(
            f"model_path={str(model_path)!r} is a speculative checkpoint: the base model already has "
            f"draft heads; give the model without them (its manifest names it as base_model).")
    source = resolve_source(model_path)
    if source.kind == "hf":
        hf.check_hf_weights_present(source.path)
        return source.path
    if source.kind == "gguf":
        return hf.gguf_to_hf(source.path)
    info = checkpoint.read_checkpoint_info(source.path)
    if info.manifest.get("producer", {}).get("quantization_config"):
        raise SpeculativeConfigError(
            f"model_path={str(model_path)!r} is a quantized checkpoint; train the draft on the "
            f"unquantized model (the draft transfers to its quantized export).")
    target = hf.cache_dir() / "native_hf" / f"{source.path.name}-{info.manifest['content_sha256'][:16]}"
    if not (target / "config.json").is_file():
        from nemo_optim.models.loader import load_model

        runtime.print0(f"exporting {source.path} to HF once for the draft: {target}")
        with runtime.parallel_runtime(runtime.ParallelConfig()):
            loaded = load_model(source.path)
            hf.export_hf(loaded.model, loaded.hf_dir, target, dtype=loaded.config.torch_dtype)
    return target


def load_base(hf_dir: Path, dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The transformers model in `hf_dir`, on this process's device, in eval mode."""
    import transformers

    dtype = dtype or (torch.bfloat16 if runtime.use_cuda() else torch.float32)
    hf_config = hf.read_hf_config(hf_dir)
    if hf_config.get("architectures", [None])[0] not in hf.SUPPORTED_ARCHITECTURES:
        raise SpeculativeConfigError(
            f"{hf_dir}: architecture {hf_config.get('architectures')} is not supported for draft heads; "
            f"supported: {', '.join(hf.SUPPORTED_ARCHITECTURES)}.")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype)
    # ModelOpt's EAGLE builds masks in the dtype the config names
    model.config.torch_dtype = dtype
    return model.to(runtime.device()).eval()


def add_draft_heads(base: torch.nn.Module, config: SpeculativeConfig) -> torch.nn.Module:
    """Converts `base` with ModelOpt (`mtsp.convert`); the base weights are frozen."""
    import modelopt.torch.speculative as mtsp

    hf_config = base.config.to_dict()
    config.check_against_model(hf_config)
    mode, mode_config = config.modelopt_mode(hf_config)
    model = mtsp.convert(base, [(mode, mode_config)])
    frozen = {EAGLE3_FEATURE_PRENORM} if config.algorithm == "eagle3" else set()
    for name, param in model.named_parameters():
        param.requires_grad = is_draft_key(name) and name not in frozen
    if config.algorithm == "medusa":
        with torch.no_grad():  # Medusa's authors start every head's LM head as the base model's
            for head in model.medusa_heads:
                head[-1].weight.copy_(model.lm_head.weight)
    return model.to(runtime.device())


def is_draft_key(name: str) -> bool:
    return name.startswith(DRAFT_PREFIXES)


def draft_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if is_draft_key(k)}


def set_draft_vocabulary(model: torch.nn.Module, token_rows: torch.Tensor) -> None:
    """Fills EAGLE's `d2t` map with the most frequent tokens of `token_rows` (ModelOpt keeps it
    as offsets: draft id i means base id i + d2t[i]) and starts the draft's LM head as the base
    model's rows for those tokens."""
    eagle = getattr(model, "eagle_module", None)
    if eagle is None or not hasattr(eagle, "d2t"):
        return
    size = eagle.d2t.numel()
    counts = torch.bincount(token_rows.flatten(), minlength=model.config.vocab_size)
    # ties broken by token id, so the map is deterministic
    order = sorted(range(len(counts)), key=lambda i: (-int(counts[i]), i))[:size]
    chosen = torch.tensor(sorted(order), dtype=torch.long)
    with torch.no_grad():
        eagle.d2t.copy_(chosen - torch.arange(size))
        eagle.lm_head.weight.copy_(model.lm_head.weight[chosen.to(model.lm_head.weight.device)])


EVALUATION = "evaluation.json"


def save_speculative_checkpoint(speculative: SpeculativeModel, path: str | Path, base_model: str,
                                producer: dict[str, Any], evaluation: dict[str, Any] | None = None) -> Path:
    """Draft weights + ModelOpt state + the base model's HF metadata (+ the measured decoding),
    atomically (main process)."""
    import modelopt.torch.opt as mto
    from safetensors.torch import save_file

    path = Path(path)
    with checkpoint.atomic_directory(path, collective=False) as tmp:
        save_file(draft_state_dict(speculative.model), str(tmp / DRAFT_WEIGHTS))
        torch.save(mto.modelopt_state(speculative.model), tmp / MODELOPT_STATE)
        checkpoint.copy_hf_metadata(speculative.base_hf_dir, tmp / checkpoint.HF_DIR)
        if evaluation is not None:
            (tmp / EVALUATION).write_text(json.dumps(evaluation, indent=2) + "\n")
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": checkpoint.library_versions(),
            "base_model": str(base_model),
            "speculative_config": dataclasses.asdict(speculative.config),
            "content_sha256": checkpoint.directory_digest(tmp),
            "producer": producer,
        }
        (tmp / checkpoint.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def read_speculative_manifest(path: str | Path) -> dict[str, Any]:
    if not is_speculative_checkpoint(path):
        raise SpeculativeConfigError(
            f"{path}: not a speculative checkpoint (no manifest.json of format {FORMAT!r}); give the "
            f"output_path of a `speculative` run.")
    return json.loads((Path(path) / checkpoint.MANIFEST).read_text())


def load_speculative_checkpoint(path: str | Path, base_model_path: str | None = None) -> SpeculativeModel:
    """The base model (from `base_model_path`, default the one it was trained on) with the
    draft restored through ModelOpt's saved state."""
    import modelopt.torch.opt as mto
    from safetensors.torch import load_file

    manifest = read_speculative_manifest(path)
    base_hf_dir = base_hf_directory(base_model_path or manifest["base_model"])
    model = mto.restore_from_modelopt_state(load_base(base_hf_dir),
                                            torch.load(Path(path) / MODELOPT_STATE, weights_only=False))
    _load_draft_weights(model, load_file(str(Path(path) / DRAFT_WEIGHTS)), path)
    config = SpeculativeConfig(**manifest["speculative_config"])
    return SpeculativeModel(model=model.to(runtime.device()).eval(), config=config, base_hf_dir=base_hf_dir)


def _load_draft_weights(model: torch.nn.Module, weights: dict[str, torch.Tensor], source: Any) -> None:
    expected = set(draft_state_dict(model))
    if set(weights) != expected:
        raise SpeculativeConfigError(
            f"{source}: draft weights do not fit the draft built from its config: missing "
            f"{sorted(expected - set(weights))[:5]}, unexpected {sorted(set(weights) - expected)[:5]}.")
    model.load_state_dict(weights, strict=False)


# --- deployment export ------------------------------------------------------------------------

def export_draft(speculative: SpeculativeModel, export_dir: str | Path) -> Path:
    """The draft in the format serving engines load, next to the unchanged base model:
    EAGLE through ModelOpt's speculative exporter (config.json + model.safetensors, the layout
    of EAGLE's official checkpoints that vLLM, SGLang and TensorRT-LLM read) plus the base layer
    ids in vLLM's numbering; Medusa heads in vLLM's Medusa layout (ModelOpt 0.43 has no Medusa
    exporter for transformers models). tests/test_engine_drafts.py serves both in vLLM."""
    export_dir = Path(export_dir)
    with checkpoint.atomic_directory(export_dir, collective=False) as tmp:
        if speculative.config.is_eagle:
            from modelopt.torch.export import export_speculative_decoding

            export_speculative_decoding(speculative.model, export_dir=str(tmp))
            _add_engine_keys(speculative.model, tmp)
        else:
            _export_medusa(speculative.model, tmp)
    return export_dir


def _add_engine_keys(model: torch.nn.Module, directory: Path) -> None:
    """What vLLM needs on top of ModelOpt's EAGLE config.json: the base layers whose hidden
    states feed the draft, in vLLM's numbering. ModelOpt (and SGLang, which adds 1 itself) name
    the decoder layer whose *output* is taken; vLLM 0.32 names the residual stream *entering*
    layer j (HF `hidden_states[j]`, j = num_hidden_layers: the last layer's output before the
    final norm), and reads a top-level `eagle_aux_hidden_state_layer_ids` before the one in
    `eagle_config`, so the top level gets ModelOpt's ids + 1 and `eagle_config` keeps them."""
    eagle_config = model.eagle_config
    if not eagle_config.use_aux_hidden_state:
        return
    path = directory / "config.json"
    config = json.loads(path.read_text())
    # ModelOpt concatenates the features in layer order, whatever order the ids are listed in
    config["eagle_aux_hidden_state_layer_ids"] = [i + 1 for i in sorted(eagle_config.eagle_aux_hidden_state_layer_ids)]
    path.write_text(json.dumps(config, indent=4) + "\n")
    prenorm = dict(model.named_parameters())[EAGLE3_FEATURE_PRENORM].detach()
    if not torch.all(prenorm == prenorm.flatten()[0]):
        runtime.print0(
            f"warning: {EAGLE3_FEATURE_PRENORM} was trained (max |w - mean| "
            f"{float((prenorm - prenorm.mean()).abs().max()):.3g}): engines normalize the draft's base features "
            f"without it, so their acceptance can differ from the one measured here (outputs stay lossless).")


def _export_medusa(model: torch.nn.Module, directory: Path) -> None:
    from safetensors.torch import save_file

    weights = {}
    for name, tensor in draft_state_dict(model).items():
        # medusa_heads.{head}.{block}.linear.{weight,bias} (ResBlocks), medusa_heads.{head}.{last}.weight
        _, head, index, *rest = name.split(".")
        if rest[0] == "linear":
            weights[f"blocks.{head}.layers.{index}.{rest[1]}"] = tensor
        else:
            weights[f"lm_heads.{head}.{rest[0]}"] = tensor
    save_file(weights, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({
        "architectures": ["MedusaModel"], "model_type": "medusa",
        "hidden_size": model.config.hidden_size, "vocab_size": model.config.vocab_size,
        "num_heads": model.medusa_num_heads, "num_hidden_layers": model.medusa_num_layers,
        "truncated_vocab_size": None, "original_lm_head": False,
        # ModelOpt's ResBlocks have biases; vLLM 0.32 builds its blocks without them (and skips
        # the bias tensors without a word) unless the config says so
        "medusa_fc_bias": any(name.endswith(".bias") for name in weights),
    }, indent=2) + "\n")


def load_exported_draft(speculative: SpeculativeModel, export_dir: str | Path) -> None:
    """Loads an export written by `export_draft` back into `speculative`'s draft (the check
    that the export holds exactly the trained draft)."""
    from safetensors.torch import load_file

    weights = load_file(str(Path(export_dir) / "model.safetensors"))
    if speculative.config.is_eagle:
        if not hasattr(speculative.model.eagle_module, "lm_head"):
            weights.pop("lm_head.weight")  # the exporter adds the base model's LM head for the engine
        mapped = {f"eagle_module.{k}": v for k, v in weights.items()}
    else:
        mapped = {}
        for name, tensor in weights.items():
            kind, head, *rest = name.split(".")
            if kind == "blocks":
                mapped[f"medusa_heads.{head}.{rest[1]}.linear.{rest[2]}"] = tensor
            else:
                last = speculative.model.medusa_num_layers
                mapped[f"medusa_heads.{head}.{last}.{rest[0]}"] = tensor
    _load_draft_weights(speculative.model, mapped, export_dir)


def draft_loss(batch: dict, output) -> tuple[torch.Tensor, dict]:
    """ModelOpt's own draft loss (EAGLE: KL to the base model's next-token distribution over
    the training-time-test steps; Medusa: decayed cross-entropy of each head), and EAGLE's
    per-step top-1 agreement with the base model."""
    loss = output.loss
    metrics = {"loss": loss.detach().clone()}
    for step, accuracy in enumerate((getattr(output, "train_acc", None) or [[]])[0]):
        metrics[f"draft_top1_step{step + 1}"] = torch.tensor(float(accuracy))
    return loss, metrics
