"""megatron-core models built by nemo-optim against transformers (the oracle)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers

from nemo_optim.models.config import GPTModelConfig
from nemo_optim.models.forward import forward_logits
from nemo_optim.models.hf import ModelSourceError, config_from_hf, export_hf
from nemo_optim.models.loader import load_model, resolve_source
from tiny_models import ARCHITECTURES, VOCAB_SIZE


def _tokens(seed=0, batch=2, seq=24):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB_SIZE, (batch, seq + 1), generator=generator)


def _hf_logits(hf_dir, tokens):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(tokens[:, :-1]).logits


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_mcore_logits_match_transformers(arch, tiny_hf_models, runtime_single):
    tokens = _tokens()
    loaded = load_model(tiny_hf_models[arch])
    ours = forward_logits(loaded.model, tokens)
    reference = _hf_logits(tiny_hf_models[arch], tokens)
    assert ours.shape == reference.shape
    assert (ours - reference).abs().max().item() <= 1e-3
    assert torch.equal(ours.argmax(-1), reference.argmax(-1))
    # built without megatron's random values (every weight was imported), with the tensor-parallel
    # attributes megatron sets while initializing; modules built later from the config initialise
    fc1, fc2 = (loaded.model.decoder.layers[0].mlp.linear_fc1.weight,
                loaded.model.decoder.layers[0].mlp.linear_fc2.weight)
    assert (fc1.tensor_model_parallel, fc1.partition_dim, fc2.tensor_model_parallel, fc2.partition_dim) == (
        True, 0, True, 1)
    assert "_zeros_instead_of_random" not in repr(loaded.model.config.init_method)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_hf_export_round_trip_reloads_with_identical_logits(arch, tiny_hf_models, runtime_single, tmp_path):
    tokens = _tokens(seed=1)
    loaded = load_model(tiny_hf_models[arch])
    export_dir = export_hf(loaded.model, loaded.hf_dir, tmp_path / "export", dtype=torch.float32)
    exported = _hf_logits(export_dir, tokens)
    original = _hf_logits(tiny_hf_models[arch], tokens)
    torch.testing.assert_close(exported, original, rtol=0, atol=0)
    # the export is a plain HF directory: no stray index files, tokenizer included
    assert not list(export_dir.glob("model-*-of-*.json"))
    assert transformers.AutoTokenizer.from_pretrained(str(export_dir)).eos_token == "<|endoftext|>"
    assert not list(tmp_path.glob(".*partial"))


def test_config_from_hf_reads_every_shape_field(tiny_hf_models):
    qwen3 = config_from_hf(tiny_hf_models["qwen3"])
    assert (qwen3.num_layers, qwen3.hidden_size, qwen3.ffn_hidden_size) == (2, 64, 128)
    assert (qwen3.num_attention_heads, qwen3.num_query_groups, qwen3.kv_channels) == (4, 2, 32)
    assert qwen3.qk_layernorm and qwen3.tie_word_embeddings and not qwen3.add_qkv_bias
    qwen2 = config_from_hf(tiny_hf_models["qwen2"])
    assert qwen2.add_qkv_bias and not qwen2.qk_layernorm
    assert config_from_hf(tiny_hf_models["llama_tied"]).rotary_base == 500000.0


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_parameter_formula_matches_transformers(arch, tiny_hf_models):
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_hf_models[arch]))
    assert config_from_hf(tiny_hf_models[arch]).num_parameters() == hf_model.num_parameters()


def test_unsupported_architecture_is_one_clear_error(tiny_hf_models, tmp_path):
    bad = tmp_path / "gpt2"
    shutil.copytree(tiny_hf_models["llama"], bad)
    config = json.loads((bad / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelSourceError,
                       match="GPT2LMHeadModel.*supported: LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"):
        config_from_hf(bad)


def test_missing_paths_and_hub_ids_are_refused(tmp_path):
    with pytest.raises(ModelSourceError, match="found nothing.*Hub ids are not downloaded"):
        resolve_source("meta-llama/Llama-3.1-8B")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSourceError, match="directory without config.json"):
        resolve_source(tmp_path / "empty")


def test_missing_weights_is_one_clear_error(tiny_hf_models, tmp_path, runtime_single):
    bad = tmp_path / "no_weights"
    bad.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_hf_models["llama"] / name, bad)
    with pytest.raises(ModelSourceError, match="no \\*.safetensors weights"):
        load_model(bad)


def test_shape_mismatch_names_the_problem(tiny_hf_models, tmp_path, runtime_single):
    bad = tmp_path / "mismatch"
    shutil.copytree(tiny_hf_models["llama"], bad)
    config = json.loads((bad / "config.json").read_text())
    config["intermediate_size"] = 96
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelSourceError, match="weights do not match config.json"):
        load_model(bad)


def test_invalid_model_config_lists_every_error():
    with pytest.raises(ValueError) as error:
        GPTModelConfig(num_layers=0, hidden_size=64, ffn_hidden_size=128, num_attention_heads=6,
                       num_query_groups=4, vocab_size=512, dtype="float8")
    message = str(error.value)
    assert "num_layers=0" in message and "num_query_groups=4" in message and "dtype='float8'" in message


def test_local_spec_attention_is_torch_sdpa_and_equals_megatrons(tiny_hf_models, runtime_single):
    """The CPU spec's core attention computes causal attention with torch's fused kernel; on the
    same query/key/value (grouped query heads) it equals megatron's own DotProductAttention."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from nemo_optim.models.attention import SDPADotProductAttention

    model = load_model(tiny_hf_models["llama"]).model
    attention = model.decoder.layers[0].self_attention.core_attention
    assert type(attention) is SDPADotProductAttention
    heads, groups = attention.num_attention_heads_per_partition, attention.num_query_groups_per_partition
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(17, 2, heads, attention.hidden_size_per_attention_head, generator=generator)
    key, value = (torch.randn(17, 2, groups, attention.hidden_size_per_attention_head, generator=generator)
                  for _ in range(2))
    ours = attention(query, key, value, None)
    megatrons = DotProductAttention.forward(attention, query, key, value, None)
    assert ours.shape == megatrons.shape == (17, 2, heads * attention.hidden_size_per_attention_head)
    torch.testing.assert_close(ours, megatrons, atol=1e-6, rtol=1e-5)
