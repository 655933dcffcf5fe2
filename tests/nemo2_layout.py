"""A NeMo 2 checkpoint directory of an HF Llama, laid out as NeMo 2.7.3 writes one - without NeMo
and without nemo-optim's loader code, so the test compares two independent readings of the format.

What NeMo 2 writes was recorded from a checkpoint its own `llm.import_ckpt` made on CPU
(tests/nemo2/write_checkpoint.py): tests/data/nemo2_tiny_llama/context/model.yaml (the config, as
NeMo dumped it) and weights_layout.json (every weight key and its shape in the dist-checkpoint).
The weights here are assembled by hand from the HF tensors with megatron's layout (per query group:
its query heads, then its key, then its value; gate then up projection in fc1; layers stacked)
and saved with torch.distributed.checkpoint, as megatron's torch_dist backend stores them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file

RECORDED = Path(__file__).resolve().parent / "data" / "nemo2_tiny_llama"


def recorded_layout() -> dict[str, list[int]]:
    return json.loads((RECORDED / "weights_layout.json").read_text())


def _nemo2_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    config = json.loads((hf_dir / "config.json").read_text())
    weights = load_file(hf_dir / "model.safetensors")
    heads, groups, hidden = config["num_attention_heads"], config["num_key_value_heads"], config["hidden_size"]
    head_dim = hidden // heads
    layers = []
    for index in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{index}."
        q = weights[prefix + "self_attn.q_proj.weight"].view(groups, heads // groups * head_dim, hidden)
        k = weights[prefix + "self_attn.k_proj.weight"].view(groups, head_dim, hidden)
        v = weights[prefix + "self_attn.v_proj.weight"].view(groups, head_dim, hidden)
        layers.append({
            "self_attention.linear_qkv.weight": torch.cat([q, k, v], dim=1).reshape(-1, hidden),
            "self_attention.linear_qkv.layer_norm_weight": weights[prefix + "input_layernorm.weight"],
            "self_attention.linear_proj.weight": weights[prefix + "self_attn.o_proj.weight"],
            "mlp.linear_fc1.weight": torch.cat([weights[prefix + "mlp.gate_proj.weight"],
                                                weights[prefix + "mlp.up_proj.weight"]]),
            "mlp.linear_fc1.layer_norm_weight": weights[prefix + "post_attention_layernorm.weight"],
            "mlp.linear_fc2.weight": weights[prefix + "mlp.down_proj.weight"],
        })
    tensors = {f"module.decoder.layers.{name}": torch.stack([layer[name] for layer in layers]) for name in layers[0]}
    tensors["module.embedding.word_embeddings.weight"] = weights["model.embed_tokens.weight"]
    tensors["module.decoder.final_layernorm.weight"] = weights["model.norm.weight"]
    tensors["module.output_layer.weight"] = weights.get("lm_head.weight", weights["model.embed_tokens.weight"])
    return {name: tensor.contiguous().clone() for name, tensor in tensors.items()}


def write_nemo2_checkpoint(hf_dir: Path, output: Path) -> Path:
    """`output`/context (NeMo's recorded model.yaml, the HF tokenizer files in nemo_tokenizer/) and
    `output`/weights (the HF model's tensors under NeMo 2's keys)."""
    tensors = _nemo2_tensors(Path(hf_dir))
    assert {name: list(t.shape) for name, t in tensors.items()} == recorded_layout(), "not NeMo 2's layout"
    context = output / "context"
    (context / "nemo_tokenizer").mkdir(parents=True)
    shutil.copy(RECORDED / "context" / "model.yaml", context / "model.yaml")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(hf_dir) / name).is_file():
            shutil.copy(Path(hf_dir) / name, context / "nemo_tokenizer" / name)
    weights = output / "weights"
    dcp.save(tensors, checkpoint_id=str(weights), no_dist=True)
    # megatron's dist-checkpoint markers, as NeMo 2 wrote them
    (weights / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                                                       "common_backend": "torch", "common_backend_version": 1}))
    torch.save({}, weights / "common.pt")
    return output
