"""NeMo 2 checkpoints as model sources.

Default suite: a NeMo 2 directory laid out as NeMo 2.7.3 writes one (its recorded model.yaml and
weight layout; tests/nemo2_layout.py, no NeMo needed), holding the tiny HF Llama's weights; the
oracle is transformers on that HF model. The test marked `nemo2` has NeMo 2 itself write the
checkpoint (`make nemo2-venv`) and checks both the logits and that the recorded layout is NeMo's.
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
from nemo2_layout import recorded_layout, write_nemo2_checkpoint

REPO = Path(__file__).resolve().parents[1]
NEMO2_PYTHON = REPO / ".venv-nemo2" / "bin" / "python"


@pytest.fixture(scope="module")
def nemo2_checkpoint(tiny_hf_models, tmp_path_factory) -> Path:
    return write_nemo2_checkpoint(tiny_hf_models["llama"], tmp_path_factory.mktemp("nemo2") / "tiny_llama")


@pytest.fixture(scope="module")
def expected(tiny_hf_models, tmp_path_factory) -> Path:
    """transformers' logits of the HF model the NeMo 2 checkpoint holds, saved for the workers."""
    tokens = torch.randint(0, 512, (2, 33), generator=torch.Generator().manual_seed(0))
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf_models["llama"]).eval()
    with torch.no_grad():
        logits = model(tokens[:, :-1]).logits
    path = tmp_path_factory.mktemp("expected") / "expected.pt"
    torch.save({"tokens": tokens, "logits": logits}, path)
    return path


def _logits_difference(model_path, expected_path) -> float:
    expected = torch.load(expected_path)
    with runtime.parallel_runtime():
        loaded = load_model(model_path)
        logits = forward_logits(loaded.model, expected["tokens"])
    return (logits - expected["logits"]).abs().max().item()


def test_a_nemo2_checkpoint_loads_with_its_tokenizer_and_transformers_logits(nemo2_checkpoint, expected):
    assert resolve_source(nemo2_checkpoint).kind == "nemo2"
    assert _logits_difference(nemo2_checkpoint, expected) < 1e-4
    with runtime.parallel_runtime():
        loaded = load_model(nemo2_checkpoint)
        tokenizer = load_tokenizer(loaded.hf_dir)
    reference = transformers.AutoTokenizer.from_pretrained(nemo2_checkpoint / "context" / "nemo_tokenizer")
    text = "The return value is an integer."
    assert tokenizer.encode(text) == reference.encode(text)
    assert (loaded.config.num_layers, loaded.config.num_query_groups, loaded.config.layernorm_epsilon) == (2, 2, 1e-6)


def test_stages_take_a_nemo2_checkpoint_and_export_it_to_hf(nemo2_checkpoint, expected, tmp_path):
    """Export (any stage's model path goes through the same loader): transformers reads the HF
    export of the NeMo 2 checkpoint and computes the same logits."""
    from nemo_optim.convert import export_ckpt

    export_ckpt(path=str(nemo2_checkpoint), output_path=str(tmp_path / "hf"), dtype="float32")
    expected = torch.load(expected)
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
def test_unsupported_nemo2_configs_are_refused_before_launch_naming_the_field(case, nemo2_checkpoint, tmp_path, capsys):
    changes, expected = UNSUPPORTED[case]
    checkpoint = tmp_path / "nemo2"
    shutil.copytree(nemo2_checkpoint, checkpoint)
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
def test_a_nemo2_checkpoint_loads_at_tp2_and_pp2(tp, pp, nemo2_checkpoint, expected):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
               str(REPO / "tests" / "distributed" / "logits_worker.py"), "--model", str(nemo2_checkpoint),
               "--expected", str(expected), "--tp", str(tp), "--pp", str(pp), "--atol", "1e-4"]
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
    # what tests/nemo2_layout.py writes without NeMo is what NeMo writes
    import torch.distributed.checkpoint as dcp

    stored = dcp.FileSystemReader(str(tmp_path / "nemo2" / "weights")).read_metadata().state_dict_metadata
    assert {k: list(v.size) for k, v in stored.items() if "_extra_state" not in k} == recorded_layout()
    recorded = yaml.safe_load((REPO / "tests" / "data" / "nemo2_tiny_llama" / "context" / "model.yaml").read_text())
    assert yaml.safe_load((tmp_path / "nemo2" / "context" / "model.yaml").read_text())["config"] == recorded["config"]
    tokens = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model.eval()(tokens[:, :-1]).logits
    with runtime.parallel_runtime():
        logits = forward_logits(load_model(tmp_path / "nemo2").model, tokens)
    assert (logits - expected).abs().max().item() < 1e-4
