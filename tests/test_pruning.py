"""Pruning a tiny real Llama / Qwen3: every axis gives the requested shapes, saves, reloads,
exports to HF and matches transformers; cached scores; invalid configs."""

from __future__ import annotations


import pytest
import torch
import transformers

from nemo_optim import compat, runtime
from nemo_optim.data.corpus import DataConfig
from nemo_optim.models.forward import forward_logits
from nemo_optim.models.loader import load_model
from nemo_optim.pruning.config import PruningConfig, PruningConfigError
from nemo_optim.pruning.pruner import drop_decoder_layers, prune_language_model
from nemo_optim.stages.prune import prune
from tiny_models import VOCAB_SIZE

AXES = {
    "width": PruningConfig(target_hidden_size=48, target_ffn_hidden_size=96, target_num_attention_heads=2),
    "ffn_only": PruningConfig(target_ffn_hidden_size=64),
    "depth_importance": PruningConfig(target_num_layers=1),
    "drop_layers": PruningConfig(drop_layers=[1]),
}


def _tokens(seed=0):
    return torch.randint(0, VOCAB_SIZE, (2, 17), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize("axis", [axis if axis == "drop_layers" else pytest.param(axis, marks=pytest.mark.minitron)
                                  for axis in AXES])
def test_each_axis_prunes_saves_reloads_and_exports(arch, axis, tiny_hf_models, tmp_path):
    config = AXES[axis]
    save, export = tmp_path / "pruned", tmp_path / "hf"
    prune(model_path=str(tiny_hf_models[arch]), output_path=str(save), pruning_config=config,
          num_train_samples=4, data=DataConfig(seq_length=64), hf_export_path=str(export))
    tokens = _tokens()
    with runtime.parallel_runtime():
        loaded = load_model(save)
        original = load_model(tiny_hf_models[arch]).config
        expected = config.pruned_model_config(original)
        assert loaded.config == expected
        assert (sum(p.numel() for p in loaded.model.parameters()) == expected.num_parameters()
                < original.num_parameters())
        layer = loaded.model.decoder.layers[0]
        assert layer.mlp.linear_fc2.weight.shape == (expected.hidden_size, expected.ffn_hidden_size)
        assert layer.self_attention.linear_proj.weight.shape == (expected.hidden_size,
                                                                 expected.num_attention_heads * expected.kv_channels)
        ours = forward_logits(loaded.model, tokens)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(export), dtype=torch.float32).eval()
    assert (hf_model.config.hidden_size == expected.hidden_size
            and hf_model.config.num_hidden_layers == expected.num_layers)
    with torch.no_grad():
        reference = hf_model(tokens[:, :-1]).logits
    assert (ours - reference).abs().max().item() <= 1e-4


def test_drop_layers_keeps_the_other_layers_weights(tiny_hf_models, runtime_single):
    loaded = load_model(tiny_hf_models["llama"])
    kept = loaded.model.decoder.layers[1].mlp.linear_fc1.weight.detach().clone()
    model, config = prune_language_model(loaded.model, loaded.config, PruningConfig(drop_layers=[1]))
    assert config.num_layers == 1
    torch.testing.assert_close(model.decoder.layers[0].mlp.linear_fc1.weight, kept, rtol=0, atol=0)


@pytest.mark.skipif(compat.minitron_needs_transformer_engine(),
                    reason="ModelOpt >= 0.44 imports its layer dropping only with Transformer Engine")
def test_drop_layers_does_what_modelopts_layer_dropping_does(tiny_hf_models, runtime_single):
    """Oracle: ModelOpt's drop_mcore_language_model_layers on a second copy (ModelOpt 0.43)."""
    from modelopt.torch.prune.plugins.mcore_minitron import drop_mcore_language_model_layers

    ours, theirs = load_model(tiny_hf_models["qwen3"]).model, load_model(tiny_hf_models["qwen3"]).model
    drop_decoder_layers(ours, [2])
    drop_mcore_language_model_layers(theirs, layers_to_drop=[2])
    assert ([layer.layer_number for layer in ours.decoder.layers]
            == [layer.layer_number for layer in theirs.decoder.layers])
    assert ours.config.num_layers == theirs.config.num_layers == 1
    tokens = _tokens(2)
    torch.testing.assert_close(forward_logits(ours, tokens), forward_logits(theirs, tokens), rtol=0, atol=0)


@pytest.mark.skipif(not compat.minitron_needs_transformer_engine(), reason="Minitron runs on CPU with ModelOpt 0.43")
def test_minitron_on_local_layers_is_refused_before_launch_in_one_line(tiny_hf_models, tmp_path, capsys):
    import launch

    code = launch.main(["prune_recipe", f"model_path={tiny_hf_models['llama']}", f"output_path={tmp_path / 'p'}",
                        "pruning_config.target_num_layers=1", "--yes"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and lines[-1].startswith(
        "error: prune_recipe: pruning_config: Minitron pruning with nvidia-modelopt")
    assert 'transformer_impl="transformer_engine"' in lines[-1] and "drop_layers" in lines[-1]
    assert not (tmp_path / "p").exists()


@pytest.mark.minitron
def test_cached_scores_prune_to_another_target_without_recomputing(tiny_hf_models, tiny_tokenizer, runtime_single,
                                                                   tmp_path):
    from nemo_optim.data.packing import packed_sequences

    scores = tmp_path / "scores"
    batches = packed_sequences(DataConfig(seq_length=64), "calibration", tiny_tokenizer, 4).split(2)

    def forward_loop(model):
        for batch in batches:
            forward_logits(model, batch)

    loaded = load_model(tiny_hf_models["llama"])
    prune_language_model(loaded.model, loaded.config, PruningConfig(target_ffn_hidden_size=96), forward_loop,
                         str(scores))
    assert (scores / "rank0.pth").is_file()
    fresh = load_model(tiny_hf_models["llama"])
    from_scratch, _ = prune_language_model(fresh.model, fresh.config, PruningConfig(target_ffn_hidden_size=64),
                                           forward_loop)

    def must_not_run(model):
        raise AssertionError("importance was recomputed")

    again = load_model(tiny_hf_models["llama"])
    from_cache, config = prune_language_model(again.model, again.config, PruningConfig(target_ffn_hidden_size=64),
                                              must_not_run, str(scores))
    assert config.ffn_hidden_size == 64
    tokens = _tokens(1)
    torch.testing.assert_close(forward_logits(from_cache, tokens), forward_logits(from_scratch, tokens), rtol=0, atol=0)


@pytest.mark.parametrize("kwargs,message", [
    pytest.param({"target_hidden_size": 128}, "target_hidden_size=128 is larger than the model's 64",
                 marks=pytest.mark.minitron),
    pytest.param({"target_num_attention_heads": 3},
                 "target_num_attention_heads=3 must be a multiple of num_query_groups=2", marks=pytest.mark.minitron),
    pytest.param({"target_num_query_groups": 1}, "cannot prune query groups", marks=pytest.mark.minitron),
    ({"drop_layers": [3]}, r"drop_layers \[3\] out of range: layers are numbered 1..2"),
    ({"drop_layers": [1, 2]}, "would remove every layer"),
    pytest.param({"target_params": 1e9}, "target_params=1e\\+09 is not below the model's", marks=pytest.mark.minitron),
])
def test_impossible_targets_fail_before_any_work(kwargs, message, tiny_hf_models, tmp_path):
    with pytest.raises(PruningConfigError, match=message):
        prune(model_path=str(tiny_hf_models["llama"]), output_path=str(tmp_path / "out"),
              pruning_config=PruningConfig(**kwargs), num_train_samples=2)
    assert not list(tmp_path.iterdir())


@pytest.mark.minitron
def test_target_params_search_finds_an_architecture_under_the_budget(tiny_hf_models, tmp_path):
    with runtime.parallel_runtime():
        original = load_model(tiny_hf_models["llama"]).config
    budget = 0.8 * original.num_parameters()
    save, export = tmp_path / "pruned", tmp_path / "hf"
    prune(model_path=str(tiny_hf_models["llama"]), output_path=str(save), num_train_samples=8,
          pruning_config=PruningConfig(target_params=budget, top_k=3), data=DataConfig(seq_length=64),
          hf_export_path=str(export))
    tokens = _tokens(1)
    with runtime.parallel_runtime():
        loaded = load_model(save)
        count = sum(p.numel() for p in loaded.model.parameters())
        assert count == loaded.config.num_parameters()
        # the largest candidates under the budget are the ones scored
        assert 0.6 * budget <= count <= budget
        ours = forward_logits(loaded.model, tokens)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(str(export), dtype=torch.float32).eval()
    with torch.no_grad():
        assert (ours - hf_model(tokens[:, :-1]).logits).abs().max().item() <= 1e-4


def test_config_level_errors():
    with pytest.raises(PruningConfigError, match="target_params cannot be combined with target_num_layers"):
        PruningConfig(target_params=1e6, target_num_layers=1)
    with pytest.raises(PruningConfigError, match="drop_layers cannot be combined with target_"):
        PruningConfig(drop_layers=[1], target_num_layers=1)
    with pytest.raises(PruningConfigError, match="set at least one target_"):
        PruningConfig()
    with pytest.raises(PruningConfigError, match="target_ffn_hidden_size=0 must be a positive integer"):
        PruningConfig(target_ffn_hidden_size=0)
