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
from nemo_optim.models.hf import SMOLLM2
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
    from nemo_optim.stages.convert import export_ckpt

    export_ckpt(model_path=str(nemo2_checkpoint), output_path=str(tmp_path / "hf"), dtype="float32")
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
    code = launch.main(["prune_recipe", f"model_path={checkpoint}", f"output_path={tmp_path / 'pruned'}", "--yes"])
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


# ---- out: nemo-optim -> NeMo 2 checkpoint directory ----

def test_fiddle_json_is_what_fiddle_itself_writes_and_builds():
    """nemo_optim.models.fiddle_json writes io.json without fiddle; fiddle (here from nemo_run's
    dependencies) must read it back to the same objects and write the same document."""
    import json

    import fiddle as fdl
    from fiddle._src.experimental import serialization

    from nemo_optim.data.corpus import DataConfig
    from nemo_optim.evaluation import EvaluationConfig
    from nemo_optim.models.fiddle_json import Call, ClassRef, serialize

    tree = Call("nemo_optim.evaluation.EvaluationConfig", {
        "data": Call("nemo_optim.data.corpus.DataConfig", {"source": "embedded:docstrings", "seq_length": 64}),
        "num_sequences": 3, "micro_batch_size": 1})
    ours = serialize(tree)
    built = fdl.build(serialization.load_json(json.dumps(ours)))
    assert built == EvaluationConfig(data=DataConfig(source="embedded:docstrings", seq_length=64), num_sequences=3,
                                     micro_batch_size=1)
    theirs = json.loads(serialization.dump_json(fdl.Config(
        EvaluationConfig, data=fdl.Config(DataConfig, source="embedded:docstrings", seq_length=64), num_sequences=3,
        micro_batch_size=1)))
    assert ours == theirs
    # class and function references (NeMo's activation_func, params_dtype) are pyrefs
    assert serialize(Call("nemo_optim.data.corpus.DataConfig", {"source": ClassRef("torch.nn.functional.silu")})) == (
        json.loads(serialization.dump_json(fdl.Config(DataConfig, source=torch.nn.functional.silu))))


@pytest.fixture(scope="module")
def exported_nemo2(tiny_hf_models, tmp_path_factory) -> Path:
    """The tiny HF Llama, loaded by nemo-optim and exported as a NeMo 2 checkpoint (fp32)."""
    from nemo_optim.stages.convert import export_ckpt

    output = tmp_path_factory.mktemp("exported") / "nemo2"
    export_ckpt(model_path=str(tiny_hf_models["llama"]), output_path=str(output), target="nemo2", dtype="float32")
    return output


def test_an_exported_nemo2_checkpoint_has_nemo2s_layout_and_loads_back(exported_nemo2, expected):
    """What NeMo 2.7.3 itself wrote for this model (tests/data/nemo2_tiny_llama) is the reference
    for every weight key and shape and for each config value written; the loaded-back logits equal
    transformers' on the source model."""
    import json

    import torch.distributed.checkpoint as dcp

    stored = dcp.FileSystemReader(str(exported_nemo2 / "weights")).read_metadata().state_dict_metadata
    tensors = {k: v for k, v in stored.items() if isinstance(v, dcp.metadata.TensorStorageMetadata)}
    assert {k: list(v.size) for k, v in tensors.items() if "_extra_state" not in k} == recorded_layout()
    # megatron >= 0.17 also keeps its common state inside the .distcp files; NeMo 2's megatron
    # (0.15) reads it from common.pt, which is written on every leg
    assert all(k.startswith("common_state") or "_extra_state" in k for k in set(stored) - set(tensors))
    assert (exported_nemo2 / "weights" / "common.pt").is_file()
    recorded = yaml.safe_load((REPO / "tests" / "data" / "nemo2_tiny_llama" / "context" / "model.yaml").read_text())
    written = yaml.safe_load((exported_nemo2 / "context" / "model.yaml").read_text())
    assert written["_target_"] == recorded["_target_"]
    assert {k: recorded["tokenizer"][k] for k in written["tokenizer"]} == written["tokenizer"]
    differing = {k: (v, recorded["config"].get(k)) for k, v in written["config"].items()
                 if k not in ("params_dtype", "pipeline_dtype") and v != recorded["config"].get(k)}
    assert not differing
    io = json.loads((exported_nemo2 / "context" / "io.json").read_text())
    paths = {path for obj in io["objects"].values() for path in obj.get("paths", [])}
    assert {"<root>.model", "<root>.model.config", "<root>.model.tokenizer", "<root>.trainer"} <= paths
    assert (exported_nemo2 / "context" / "nemo_tokenizer" / "tokenizer.json").is_file()
    assert _logits_difference(exported_nemo2, expected) < 1e-4


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_models_round_trip_through_nemo2(arch, tiny_hf_models, tmp_path):
    from nemo_optim.stages.convert import export_ckpt

    export_ckpt(model_path=str(tiny_hf_models[arch]), output_path=str(tmp_path / "nemo2"), target="nemo2",
                dtype="float32")
    written = yaml.safe_load((tmp_path / "nemo2" / "context" / "model.yaml").read_text())
    assert written["_target_"].endswith(f"{arch}.{arch.capitalize()}Model")
    tokens = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(2))
    model = transformers.AutoModelForCausalLM.from_pretrained(tiny_hf_models[arch]).eval()
    with torch.no_grad():
        expected = model(tokens[:, :-1]).logits
    with runtime.parallel_runtime():
        logits = forward_logits(load_model(tmp_path / "nemo2").model, tokens)
    assert (logits - expected).abs().max().item() < 1e-4


def test_exporting_to_nemo2_refuses_quantized_models_and_unknown_targets(tmp_path, capsys):
    code = launch.main(["export_recipe", f"path={SMOLLM2}", f"output_path={tmp_path / 'x'}", "target=onnx",
                        "--yes"])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: export_recipe: target='onnx': choose one of hf, nemo2.")
    assert not (tmp_path / "x").exists()


@pytest.mark.nemo2
@pytest.mark.parametrize("student", ["original", pytest.param("pruned", marks=pytest.mark.minitron), "layer_dropped"])
def test_nemo2_itself_loads_what_nemo_optim_exports(student, tiny_hf_models, tmp_path):
    """Round trip: nemo-optim writes a NeMo 2 checkpoint (of the tiny Llama, of a student pruned in
    width and depth, and of one with a layer dropped); NeMo 2 reads it with its own loaders
    (tests/nemo2/forward_checkpoint.py) and computes the logits nemo-optim computes, with the same
    tokenizer."""
    if not NEMO2_PYTHON.is_file():
        pytest.skip("NeMo 2 is not installed: make nemo2-venv")
    from nemo_optim.stages.convert import export_ckpt
    from nemo_optim.data.corpus import DataConfig
    from nemo_optim.pruning.config import PruningConfig
    from nemo_optim.stages.prune import prune

    source = str(tiny_hf_models["llama"])
    if student == "pruned":
        source = str(tmp_path / "pruned")
        prune(model_path=str(tiny_hf_models["llama"]), output_path=source, num_train_samples=4,
              pruning_config=PruningConfig(target_ffn_hidden_size=96, target_num_layers=1),
              data=DataConfig(seq_length=64))
    elif student == "layer_dropped":  # depth pruning that runs on both legs
        source = str(tmp_path / "dropped")
        prune(model_path=str(tiny_hf_models["llama"]), output_path=source,
              pruning_config=PruningConfig(drop_layers=[1]))
    export_ckpt(model_path=source, output_path=str(tmp_path / "nemo2"), target="nemo2", dtype="float32")
    tokens = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(3))
    torch.save(tokens[:, :-1], tmp_path / "tokens.pt")
    done = subprocess.run([str(NEMO2_PYTHON), str(REPO / "tests" / "nemo2" / "forward_checkpoint.py"),
                           str(tmp_path / "nemo2"), str(tmp_path / "tokens.pt"), str(tmp_path / "nemo_logits.pt")],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    nemo = torch.load(tmp_path / "nemo_logits.pt")
    assert (nemo["model_class"], nemo["config_class"]) == ("LlamaModel", "LlamaConfig")
    with runtime.parallel_runtime():
        loaded = load_model(source)
        ours = forward_logits(loaded.model, tokens)
        tokenizer = load_tokenizer(loaded.hf_dir)
    assert nemo["logits"].shape == ours.shape
    difference = (nemo["logits"] - ours).abs().max().item()
    print(f"NeMo 2 vs nemo-optim logits ({student}): max |diff| {difference:.2e}")
    assert difference < 1e-4
    assert nemo["tokenizer_ids"] == tokenizer.encode("The return value is an integer.", add_special_tokens=False)
