"""The compress pipeline on a tiny model: every task is a recipe that NeMo-Run serializes; a
re-run skips what is current; a changed setting re-runs that stage and what depends on it; an
interrupted distillation resumes; the report has every model and its plots."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import fiddle as fdl
import nemo_run as run
import pytest
import torch

from experiments.compress_smollm2 import pipeline_tasks, run_pipeline
from nemo_optim.accuracy.items import embedded_cloze_items


def _tasks(model, work_dir, **overrides):
    settings = dict(target_num_layers=1, importance_samples=4, teacher_correction_steps=2, distill_steps=4,
                    calibration_samples=4, eval_sequences=4, seq_length=32)
    return pipeline_tasks(model=str(model), work_dir=str(work_dir), **{**settings, **overrides})


def _run_in_process(tasks) -> dict:
    """Each task exactly as its NeMo-Run process would run it (fdl.build(task)())."""
    return {name: fdl.build(task)() for name, task in tasks.items()}


def test_every_pipeline_task_serializes_and_dry_runs(tiny_hf_models, tmp_path):
    tasks = _tasks(tiny_hf_models["llama"], tmp_path / "work")
    assert (list(tasks)[:5] == ["prune", "correct_teacher", "distill", "quantize", "export"]
            and list(tasks)[-1] == "report")
    assert tasks["distill"].stage.teacher_model_path == str(tmp_path / "work" / "teacher_corrected")
    assert list(_tasks(tiny_hf_models["llama"], tmp_path / "work", teacher_correction_steps=0))[:2] == [
        "prune", "distill"]
    serializer = run.core.serialization.zlib_json.ZlibJSONSerializer()
    for task in tasks.values():
        assert serializer.deserialize(serializer.serialize(task)) == task
    assert run_pipeline(tasks, dryrun=True, name="pipeline-test") == 0


@pytest.mark.minitron  # the pipeline prunes with Minitron
def test_the_experiment_command_line_is_nemo_runs_and_a_failed_task_exits_non_zero(tmp_path):
    """`python -m experiments.compress_smollm2` is a NeMo-Run experiment entrypoint: its settings are
    `name=value` arguments; a failing first task (a model path that does not exist) ends it with that
    task's own error line and exit 1, and the tasks after it never start."""
    work = tmp_path / "work"
    result = subprocess.run([sys.executable, "-m", "experiments.compress_smollm2", f"model={tmp_path / 'missing'}",
                             f"work_dir={work}", "teacher_correction_steps=0", "--yes"],
                            cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=900)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"error: prune failed: model path '{tmp_path / 'missing'}': found nothing"), result.stderr[-2000:]
    assert "prune: FAILED" in result.stdout and not (work / "pruned").exists()


@pytest.mark.minitron  # the pipeline prunes with Minitron
def test_rerun_skips_current_stages_and_redoes_stale_ones(tiny_hf_models, tmp_path):
    model, work = tiny_hf_models["llama"], tmp_path / "work"
    first = _run_in_process(_tasks(model, work))
    stages = [name for name in first if name != "report"]
    assert all(first[name] == "ran" for name in stages)
    manifest = json.loads((work / "distilled" / "manifest.json").read_text())
    assert manifest["pipeline_fingerprint"] == json.loads((work / "state" / "distill.json").read_text())["fingerprint"]

    second = _run_in_process(_tasks(model, work))
    assert all(second[name] == "skipped" for name in stages)

    # more distillation steps: distill and everything downstream of it, not prune, the teacher
    # correction nor the original's evaluation
    third = _run_in_process(_tasks(model, work, distill_steps=6))
    assert (third["prune"] == "skipped" and third["correct_teacher"] == "skipped"
            and third["evaluate_original"] == "skipped")
    assert all(third[name] == "ran" for name in ("distill", "quantize", "export", "evaluate_distilled",
                                                   "evaluate_distilled_fp8"))

    report = (work / "report" / "report.md").read_text()
    for label in ("original", "teacher corrected", "pruned", "distilled", "distilled + FP8"):
        assert f"| {label} |" in report
    rows = {row["model"]: row for row in json.loads((work / "report" / "report.json").read_text())["rows"]}
    assert rows["pruned"]["parameters_m"] < rows["original"]["parameters_m"]
    assert rows["original"]["kl_to_original"] == pytest.approx(0, abs=1e-6)
    assert rows["teacher corrected"]["parameters_m"] == rows["original"]["parameters_m"]
    # every model scored on the whole embedded multiple-choice task
    assert {row["accuracy_items"] for row in rows.values()} == {len(embedded_cloze_items())}
    assert all(0 <= row["accuracy_norm"] <= 1 for row in rows.values()) and "accuracy 95% CI" in report
    assert (work / "report" / "models.png").stat().st_size > 1000
    assert (work / "report" / "distillation_loss.png").stat().st_size > 1000


@pytest.mark.minitron  # the pipeline prunes with Minitron
def test_interrupted_distillation_resumes_from_its_checkpoint(tiny_hf_models, tmp_path, capsys):
    import shutil

    model, work = tiny_hf_models["llama"], tmp_path / "work"
    tasks = _tasks(model, work, teacher_correction_steps=0, distill_steps=8)
    tasks["distill"].stage.training.checkpoint_interval = 3
    fdl.build(tasks["prune"])()
    fdl.build(tasks["distill"])()
    # as if killed after step 6: the output and the last checkpoint never appeared
    shutil.rmtree(work / "distilled")
    shutil.rmtree(work / "distilled_run" / "checkpoints" / "step_0000008")
    (work / "state" / "distill.json").unlink()
    capsys.readouterr()
    assert fdl.build(tasks["distill"])() == "ran"
    assert "resumed from" in capsys.readouterr().out and (work / "distilled" / "manifest.json").is_file()


def test_qad_experiment_trains_the_int4_model_and_exports_it_in_its_format(tiny_hf_models, tmp_path):
    """PTQ -> QAD -> export through the experiment's tasks: the QAD export is INT4 block 32 again
    and carries the trained weights. (Whether QAD helps is measured on SmolLM2 in
    benchmarks/qad.py: on this random tiny model INT4 costs a KL of 2e-4, below KD's noise.)"""
    from safetensors.torch import load_file

    from experiments.qad_smollm2 import qad_tasks

    model, work = tiny_hf_models["llama"], tmp_path / "work"
    tasks = qad_tasks(model=str(model), work_dir=str(work), steps=6, lr=1e-3, calibration_samples=4, eval_sequences=4,
                      seq_length=32)
    assert tasks["qad"].stage.model_path == tasks["quantize"].stage.export_path + "_native"
    assert tasks["export"].stage.model_path == tasks["qad"].stage.output_path
    serializer = run.core.serialization.zlib_json.ZlibJSONSerializer()
    assert all(serializer.deserialize(serializer.serialize(task)) == task for task in tasks.values())
    results = _run_in_process(tasks)
    assert all(results[name] == "ran" for name in results if name != "report")
    exported = json.loads((work / "qad_int4_trtllm" / "config.json").read_text())
    assert exported["quantization"]["quant_algo"] == "W4A16_AWQ"
    assert exported["quantization"]["group_size"] == 32
    ptq_weights = load_file(work / "ptq_int4" / "rank0.safetensors")
    qad_weights = load_file(work / "qad_int4_trtllm" / "rank0.safetensors")
    fc1 = next(name for name in ptq_weights if name.endswith("mlp.fc.weight"))
    assert qad_weights[fc1].dtype == ptq_weights[fc1].dtype and not torch.equal(qad_weights[fc1], ptq_weights[fc1])
    rows = {row["model"]: row for row in json.loads((work / "report" / "report.json").read_text())["rows"]}
    assert list(rows) == ["original", "INT4 PTQ", "INT4 PTQ + QAD"]
    assert 0 < rows["INT4 PTQ"]["kl_to_original"] and 0 < rows["INT4 PTQ + QAD"]["kl_to_original"]
    assert all(row["accuracy_task"] == "embedded:stdlib-cloze" for row in rows.values())
