"""NeMo 2 checkpoints as model sources.

The oracle is NeMo 2 itself: tests/data/nemo2_tiny_llama was written by nemo_toolkit 2.7.3's own
`llm.import_ckpt` (tests/nemo2/write_checkpoint.py, on CPU) from a tiny HF Llama whose norm weights
are ones; tests/data/nemo2_tiny_llama_expected.pt holds transformers' logits of that HF model.
The test marked `nemo2` rewrites such a checkpoint with NeMo 2 from `.venv-nemo2` (make nemo2-venv).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
import yaml

import launch
from nemo_optim import runtime
from nemo_optim.models.forward import forward_logits
from nemo_optim.models.loader import load_model, load_tokenizer, resolve_source
from nemo_optim.models.nemo2 import Nemo2CheckpointError

REPO = Path(__file__).resolve().parents[1]
NEMO2_CHECKPOINT = REPO / "tests" / "data" / "nemo2_tiny_llama"
EXPECTED = REPO / "tests" / "data" / "nemo2_tiny_llama_expected.pt"
NEMO2_PYTHON = REPO / ".venv-nemo2" / "bin" / "python"


def _logits_difference(model_path) -> float:
    expected = torch.load(EXPECTED)
    with runtime.parallel_runtime():
        loaded = load_model(model_path)
        logits = forward_logits(loaded.model, expected["tokens"])
    return (logits - expected["logits"]).abs().max().item()


def test_a_checkpoint_written_by_nemo2_loads_with_its_tokenizer_and_transformers_logits():
    assert resolve_source(NEMO2_CHECKPOINT).kind == "nemo2"
    assert _logits_difference(NEMO2_CHECKPOINT) < 1e-4
    with runtime.parallel_runtime():
        loaded = load_model(NEMO2_CHECKPOINT)
        tokenizer = load_tokenizer(loaded.hf_dir)
    reference = transformers.AutoTokenizer.from_pretrained(NEMO2_CHECKPOINT / "context" / "nemo_tokenizer")
    text = "The return value is an integer."
    assert tokenizer.encode(text) == reference.encode(text)
    assert (loaded.config.num_layers, loaded.config.num_query_groups, loaded.config.layernorm_epsilon) == (2, 2, 1e-6)


def test_stages_take_a_nemo2_checkpoint_and_export_it_to_hf(tmp_path):
    """Export (any stage's model path goes through the same loader): transformers reads the HF
    export of the NeMo 2 checkpoint and computes the same logits."""
    from nemo_optim.convert import export_ckpt

    export_ckpt(path=str(NEMO2_CHECKPOINT), output_path=str(tmp_path / "hf"), dtype="float32")
    expected = torch.load(EXPECTED)
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        logits = model(expected["tokens"][:, :-1]).logits
    assert (logits - expected["logits"]).abs().max().item() < 1e-4


UNSUPPORTED = {
    "moe": ({"num_moe_experts": 8}, "config.num_moe_experts=8 (needs None)"),
    "activation": ({"activation_func": {"_call_": False, "_target_": "torch.nn.functional.gelu"}},
                   "config.activation_func='torch.nn.functional.gelu' (needs torch.nn.functional.silu)"),
    "sliding_window": ({"window_size": [4096, 0]}, "config.window_size=[4096, 0] (needs None)"),
    "mamba": ({"is_hybrid_model": True}, "config.is_hybrid_model=True (needs False)"),
}


@pytest.mark.parametrize("case", sorted(UNSUPPORTED))
def test_unsupported_nemo2_configs_are_refused_before_launch_naming_the_field(case, tmp_path, capsys):
    changes, expected = UNSUPPORTED[case]
    checkpoint = tmp_path / "nemo2"
    shutil.copytree(NEMO2_CHECKPOINT, checkpoint)
    model_yaml = checkpoint / "context" / "model.yaml"
    data = yaml.safe_load(model_yaml.read_text())
    data["config"].update(changes)
    model_yaml.write_text(yaml.safe_dump(data))
    code = launch.main(["prune_recipe", f"nemo_checkpoint={checkpoint}", f"save_path={tmp_path / 'pruned'}", "--yes"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2
    assert last == f"error: prune_recipe: {model_yaml}: not supported by nemo-optim: {expected}."
    assert not (tmp_path / "pruned").exists()
    with pytest.raises(Nemo2CheckpointError, match="not supported by nemo-optim"):
        with runtime.parallel_runtime():
            load_model(checkpoint)


@pytest.mark.distributed
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_a_nemo2_checkpoint_loads_at_tp2_and_pp2(tp, pp):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               str(REPO / "tests" / "distributed" / "logits_worker.py"), "--model", str(NEMO2_CHECKPOINT),
               "--expected", str(EXPECTED), "--tp", str(tp), "--pp", str(pp), "--atol", "1e-4"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


@pytest.mark.nemo2
def test_nemo2_itself_writes_a_checkpoint_that_nemo_optim_loads(tiny_hf_models, tmp_path):
    if not NEMO2_PYTHON.is_file():
        pytest.skip("NeMo 2 is not installed: make nemo2-venv")
    source = tmp_path / "hf"
    shutil.copytree(tiny_hf_models["llama"], source)
    model = transformers.AutoModelForCausalLM.from_pretrained(source)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.fill_(1.0)  # see tests/nemo2/write_checkpoint.py
    model.save_pretrained(source)
    written = subprocess.run([str(NEMO2_PYTHON), str(REPO / "tests" / "nemo2" / "write_checkpoint.py"), str(source),
                              str(tmp_path / "nemo2")], capture_output=True, text=True, timeout=900)
    assert written.returncode == 0, written.stderr[-3000:]
    tokens = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.eval()(tokens[:, :-1]).logits
    with runtime.parallel_runtime():
        logits = forward_logits(load_model(tmp_path / "nemo2").model, tokens)
    assert (logits - expected).abs().max().item() < 1e-4
