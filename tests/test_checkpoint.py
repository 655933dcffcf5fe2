"""Native checkpoints: round trip, atomic writes, manifest, and TP/PP resharding under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nemo_optim import checkpoint, runtime
from nemo_optim.checkpoint import CheckpointError, atomic_directory, read_checkpoint_info, save_checkpoint
from nemo_optim.models.forward import forward_logits
from nemo_optim.models.loader import load_model
from tiny_models import VOCAB_SIZE

REPO = Path(__file__).resolve().parents[1]


def _tokens(seed=0):
    return torch.randint(0, VOCAB_SIZE, (2, 17), generator=torch.Generator().manual_seed(seed))


def test_save_load_round_trip_gives_identical_logits(tiny_hf_models, runtime_single, tmp_path):
    tokens = _tokens()
    loaded = load_model(tiny_hf_models["qwen2"])
    before = forward_logits(loaded.model, tokens)
    path = save_checkpoint(loaded.model, loaded.config, tmp_path / "ckpt", loaded.hf_dir, producer={"stage": "test"})
    restored = load_model(path)
    assert restored.config == loaded.config
    torch.testing.assert_close(forward_logits(restored.model, tokens), before, rtol=0, atol=0)

    info = read_checkpoint_info(path)
    assert info.manifest["producer"] == {"stage": "test"}
    assert info.manifest["num_parameters"] == loaded.config.num_parameters()
    from importlib import metadata

    assert info.manifest["versions"]["megatron-core"] == metadata.version("megatron-core")
    assert (path / "hf" / "tokenizer.json").is_file() and (path / "hf" / "config.json").is_file()
    assert not list((path / "hf").glob("*.safetensors"))
    # the content hash covers everything but the manifest itself
    (path / "manifest.json").rename(tmp_path / "manifest.json")
    assert checkpoint.directory_digest(path) == info.manifest["content_sha256"]


def test_save_hands_the_writer_no_views_and_no_copies(tiny_hf_models, runtime_single, tmp_path, monkeypatch):
    """megatron's writer clones every tensor that is a view of a larger one, all before it writes:
    the SwiGLU fc1 weight is saved as two halves. save_checkpoint hands each half over as a tensor
    over just its slice of the parameter's memory (`views_handed_over_whole`): no view reaches the
    writer, nothing is copied, and the model is not touched."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    def tensors(sharded_state_dict):
        return [item for item in nested_values(sharded_state_dict) if isinstance(item, ShardedTensor)]

    def views(sharded_state_dict):
        return sorted(item.key for item in tensors(sharded_state_dict)
                      if item.data.untyped_storage().nbytes() > item.data.numel() * item.data.element_size())

    tokens = _tokens()
    model = load_model(tiny_hf_models["llama"]).model
    without_the_handover = model.sharded_state_dict()
    apply_factories(without_the_handover)
    # 2 halves x 2 layers (one stacked key)
    assert views(without_the_handover) == ["decoder.layers.mlp.linear_fc1.weight"] * 4
    del without_the_handover
    before = {name: (parameter, parameter.detach().clone()) for name, parameter in model.named_parameters()}
    parameter_memory = [(p.data_ptr(), p.data_ptr() + p.numel() * p.element_size()) for p in model.parameters()]
    expected = forward_logits(model, tokens)

    seen = {}
    real_save = dist_checkpointing.save

    def save_and_look(sharded_state_dict, *args, **kwargs):
        seen["views"] = views(sharded_state_dict)
        seen["copies"] = sorted(item.key for item in tensors(sharded_state_dict) if item.data.numel() > 1 and not any(
            start <= item.data.data_ptr() < end for start, end in parameter_memory))
        seen["fc1 pieces"] = sum(item.key.endswith("linear_fc1.weight") for item in tensors(sharded_state_dict))
        return real_save(sharded_state_dict, *args, **kwargs)

    monkeypatch.setattr(dist_checkpointing, "save", save_and_look)
    loaded = load_model(tiny_hf_models["llama"])
    path = save_checkpoint(model, loaded.config, tmp_path / "ckpt", loaded.hf_dir)
    assert seen == {"views": [], "copies": [], "fc1 pieces": 4}
    for name, parameter in model.named_parameters():
        assert parameter is before[name][0] and torch.equal(parameter, before[name][1]), name
    torch.testing.assert_close(forward_logits(model, tokens), expected, rtol=0, atol=0)
    torch.testing.assert_close(forward_logits(load_model(path).model, tokens), expected, rtol=0, atol=0)


def test_interrupted_save_leaves_no_checkpoint(tiny_hf_models, runtime_single, tmp_path):
    loaded = load_model(tiny_hf_models["llama"])
    target = tmp_path / "ckpt"

    class Crash(Exception):
        pass

    with pytest.raises(Crash):
        with atomic_directory(target) as partial:
            (partial / "weights").mkdir()
            raise Crash
    assert not target.exists() and not list(tmp_path.iterdir())
    with pytest.raises(CheckpointError, match="not a nemo-optim checkpoint"):
        read_checkpoint_info(target)
    # a save over an existing checkpoint replaces it whole
    save_checkpoint(loaded.model, loaded.config, target, loaded.hf_dir, producer={"n": 1})
    save_checkpoint(loaded.model, loaded.config, target, loaded.hf_dir, producer={"n": 2})
    assert read_checkpoint_info(target).manifest["producer"] == {"n": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_newer_format_is_refused(tiny_hf_models, runtime_single, tmp_path):
    loaded = load_model(tiny_hf_models["llama"])
    path = save_checkpoint(loaded.model, loaded.config, tmp_path / "ckpt", loaded.hf_dir)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["format_version"] = 99
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="v99 is not readable"):
        read_checkpoint_info(path)


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--standalone", str(REPO / "tests" / "distributed" / "logits_worker.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.distributed
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_checkpoint_saved_at_tp1_loads_resharded(tp, pp, tiny_hf_models, tmp_path):
    tokens = _tokens(seed=3)
    with runtime.parallel_runtime():
        loaded = load_model(tiny_hf_models["llama"])
        expected = forward_logits(loaded.model, tokens)
        save_checkpoint(loaded.model, loaded.config, tmp_path / "tp1", loaded.hf_dir)
    torch.save({"tokens": tokens, "logits": expected}, tmp_path / "expected.pt")

    result = _torchrun("--model", str(tmp_path / "tp1"), "--expected", str(tmp_path / "expected.pt"),
                       "--tp", str(tp), "--pp", str(pp), "--save", str(tmp_path / "resaved"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "max |logit diff|" in result.stdout

    # ... and what was saved at TP=2 / PP=2 loads back at TP=1 with the same logits
    with runtime.parallel_runtime():
        info = read_checkpoint_info(tmp_path / "resaved")
        assert info.manifest["saved_with"] == {"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp}
        torch.testing.assert_close(forward_logits(load_model(tmp_path / "resaved").model, tokens), expected,
                                   rtol=0, atol=1e-5)
