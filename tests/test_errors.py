"""Bad input through the real launcher: one line naming the file or field and the fix, a
non-zero exit, nothing written; checks that need no model run before submission; a task's
known input error is one line in its log, without a traceback."""

from __future__ import annotations

import shutil
from pathlib import Path

import nemo_run as run
import pytest

import launch
from nemo_optim.errors import InputError, OutputExistsError, one_line_input_errors, refuse_existing_outputs
from nemo_optim.prelaunch import LaunchTarget
from nemo_optim.quantization.config import ExportConfig, QuantizationConfig, QuantizationConfigError
from nemo_optim.stages.ptq import ptq
from nemo_optim_recipes.launching import launch_target


def _damaged_copy(source: Path, directory: Path, damage: str) -> Path:
    shutil.copytree(source, directory)
    if damage == "config_json":
        (directory / "config.json").write_text('{\n  "architectures": ["LlamaForCausalLM"],\n')
    elif damage == "truncated_weights":
        weights = directory / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    elif damage == "no_tokenizer":
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            (directory / name).unlink(missing_ok=True)
    return directory


DROP_LAYER_1 = ("pruning_config.drop_layers=[1]", "pruning_config.target_num_layers=None")
DAMAGE = {
    "config_json": (2, "{model}/config.json: not valid JSON (Expecting property name enclosed in double quotes at "
                       "line 3 column 1); restore config.json from the model's source."),
    # the header is read where the weights are loaded: inside the task, so the task's line
    "truncated_weights": (1, "{model}/model.safetensors: not a readable safetensors file (Error while "
                             "deserializing header: incomplete metadata, file not fully covered); it is truncated or "
                             "damaged, copy it again from the model's source."),
    "no_tokenizer": (2, "{model}: no tokenizer files (none of tokenizer.json, tokenizer.model, vocab.json, "
                        "tokenizer_config.json); copy the model's tokenizer files into this directory."),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_model_directory_is_named_with_the_fix(damage, tiny_hf_models, tmp_path, capsys):
    model = _damaged_copy(tiny_hf_models["llama"], tmp_path / "model", damage)
    code, message = DAMAGE[damage]
    output = tmp_path / "pruned"
    # depth pruning by drop_layers: runs on both legs (Minitron needs ModelOpt <= 0.43 on CPU)
    result = launch.main(["prune_recipe", f"model_path={model}", f"output_path={output}", *DROP_LAYER_1,
                          "num_train_samples=2", "--yes"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    prefix = "error: prune_recipe failed: " if code == 1 else "error: prune_recipe: "
    assert (result, last) == (code, prefix + message.format(model=model))
    assert not output.exists()


def test_a_task_prints_its_input_error_as_one_line_without_traceback(tmp_path, capsys):
    code = launch.main(["prune_recipe", f"model_path={tmp_path / 'missing'}", f"output_path={tmp_path / 'p'}",
                        *DROP_LAYER_1, "--yes"])
    out = capsys.readouterr().out
    assert code == 1
    log_dir = Path(out.split("prune_recipe: FAILED (logs: ")[1].split(")")[0])
    log = "\n".join(p.read_text(errors="replace") for p in log_dir.rglob("*.log"))
    assert f"error: model path '{tmp_path / 'missing'}': found nothing" in log
    assert "Traceback" not in log


def test_known_input_errors_become_one_line_only_inside_a_task(monkeypatch, capsys):
    @one_line_input_errors
    def stage(error):
        raise error

    with pytest.raises(InputError):  # from Python: the exception, for the caller to handle
        stage(InputError("x=1 is wrong; use 2."))
    monkeypatch.setattr("nemo_optim.errors.running_as_task", lambda: True)
    with pytest.raises(SystemExit) as exit_info:
        stage(InputError("x=1 is wrong; use 2."))
    assert exit_info.value.code == 2 and capsys.readouterr().err == "error: x=1 is wrong; use 2.\n"
    with pytest.raises(RuntimeError):  # anything unexpected keeps its traceback
        stage(RuntimeError("a bug"))


def test_every_stage_refuses_an_existing_output_with_the_same_error(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputExistsError,
                       match=r"^output_path='.*out' exists; pass overwrite=True or choose another path\.$"):
        refuse_existing_outputs([("output_path", tmp_path / "out")], overwrite=False)
    refuse_existing_outputs([("output_path", tmp_path / "out")], overwrite=True)
    assert issubclass(OutputExistsError, FileExistsError) and issubclass(OutputExistsError, InputError)


PRE_LAUNCH = {
    "gpu_format_on_cpu": (["ptq_recipe", "model_path={model}", "export_config.path={out}",
                           "quantization_config.algorithm=nvfp4"],
                          "error: ptq_recipe: quantization_config.algorithm='nvfp4' needs a CUDA GPU "
                          "(NVFP4/MX kernels); this machine has none. On CPU use fp8, fp8_pc_pt, int8, int8_sq, "
                          "int4, int4_awq or w4a8_awq."),
    "calibration_file_missing": (["ptq_recipe", "model_path={model}", "export_config.path={out}",
                                  "quantization_config.calibration_dataset={tmp}/calib.jsonl"],
                                 "error: ptq_recipe: quantization_config.calibration_dataset: "
                                 "source='{tmp}/calib.jsonl': "
                                 "file not found; give a .txt or .jsonl file, `embedded`, `embedded:pydoc`, "
                                 "`embedded:docstrings`, or `hf:<dataset>`."),
    "prune_target_too_large": (["prune_recipe", "model_path={model}", "output_path={out}",
                                "pruning_config.target_num_layers=4", "pruning_config.target_ffn_hidden_size=999"],
                               "error: prune_recipe: pruning_config: target_ffn_hidden_size=999 is larger than the "
                               "model's 128; target_num_layers=4 is larger than the model's 2."),
    "drop_layers_out_of_range": (["prune_recipe", "model_path={model}", "output_path={out}",
                                  "pruning_config.target_num_layers=None", "pruning_config.drop_layers=[3]"],
                                 "error: prune_recipe: pruning_config: drop_layers [3] out of range: layers are "
                                 "numbered 1..2."),
    "training_text_malformed": (["finetune_recipe", "model_path={model}", "output_path={out}",
                                 "data.source={tmp}/bad.jsonl"],
                                "error: finetune_recipe: data.source: {tmp}/bad.jsonl:1: not valid JSON (Expecting "
                                "value); each line must be one JSON object."),
}


@pytest.mark.parametrize("case", sorted(PRE_LAUNCH))
def test_settings_that_need_no_model_fail_before_submission(case, tiny_hf_models, tmp_path, capsys):
    (tmp_path / "bad.jsonl").write_text("not json\n")
    arguments, expected = PRE_LAUNCH[case]
    values = {"model": tiny_hf_models["llama"], "out": tmp_path / "out", "tmp": tmp_path}
    code = launch.main([a.format(**values) for a in arguments] + ["--yes"])
    captured = capsys.readouterr()
    assert (code, captured.err.strip().splitlines()[-1]) == (2, expected.format(**values))
    assert "Launching job" not in captured.out + captured.err  # nothing was submitted
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]


def test_launch_target_reads_where_and_with_what_a_job_runs():
    assert launch_target(run.LocalExecutor()) == LaunchTarget(local=True, gpus=0)  # this CPU machine
    slurm = run.SlurmExecutor(account="a", tunnel=run.LocalTunnel(job_dir=""))
    assert launch_target(slurm) == LaunchTarget(local=True, gpus=0)
    remote = run.SlurmExecutor(account="a", tunnel=run.SSHTunnel(host="h", user="u", job_dir="/j"), gpus_per_node=8)
    assert launch_target(remote) == LaunchTarget(local=False, gpus=8)
    # a Slurm job without GPUs is refused an NVFP4 calibration before it queues
    with pytest.raises(QuantizationConfigError, match="needs a CUDA GPU .* the executor gives the job none"):
        ptq.check_arguments(quantization_config=QuantizationConfig(algorithm="nvfp4"), export_config=ExportConfig(),
                            launch_target=LaunchTarget(local=False, gpus=0))
    ptq.check_arguments(quantization_config=QuantizationConfig(algorithm="nvfp4"), export_config=ExportConfig(),
                        launch_target=launch_target(remote))
