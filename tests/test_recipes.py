"""Recipes, overrides, the launcher and the `nemo llm` namespace, with no network."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import fiddle as fdl
import nemo_run as run
import pytest

import launch
from nemo_optim_recipes import llm
from nemo_optim_recipes.launching import apply_overrides
from nemo_optim_recipes.naming import parse_recipe_name, recipe_name

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(llm.RECIPES))
def test_every_recipe_builds_and_serializes(name):
    partial = llm.RECIPES[name]()
    assert isinstance(partial, run.Partial)
    serializer = run.core.serialization.zlib_json.ZlibJSONSerializer()
    restored = serializer.deserialize(serializer.serialize(partial))
    assert restored == partial
    built = fdl.build(partial)
    assert callable(built) and built.func is partial.__fn_or_cls__


def test_overrides_reach_nested_fields():
    partial = apply_overrides(llm.RECIPES["smollm2_135m_import_cpu"](),
                              ["output_path=/tmp/x", "evaluation.num_sequences=3", "evaluation.data.seq_length=64"])
    assert partial.output_path == "/tmp/x"
    assert partial.evaluation.num_sequences == 3 and partial.evaluation.data.seq_length == 64


@pytest.mark.parametrize("recipe,override,field,expected", [
    ("prune_recipe", "pruning_config.drop_layers=[7, 8]", "pruning_config.drop_layers", [7, 8]),
    ("ptq_recipe", "quantization_config.exclude_modules=['lm_head']", "quantization_config.exclude_modules",
     ["lm_head"]),
    ("ptq_recipe", "quantization_config.auto_quantize_formats=['int8_sq']",
     "quantization_config.auto_quantize_formats", ["int8_sq"]),
    ("speculative_recipe", "evaluation.draft_lengths=[1, 3]", "evaluation.draft_lengths", [1, 3]),
])
def test_list_fields_are_settable_from_the_command_line(recipe, override, field, expected):
    partial = apply_overrides(llm.RECIPES[recipe](), [override])
    node = partial
    for part in field.split("."):
        node = getattr(node, part)
    assert node == expected


def test_a_list_override_without_quotes_says_how_to_write_it(capsys):
    code = launch.main(["ptq_recipe", "quantization_config.exclude_modules=[lm_head]", "--dryrun"])
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: ptq_recipe: override 'quantization_config.exclude_modules=[lm_head]': expected a list written as a "
        "Python literal, strings quoted (e.g. [7, 8] or ['lm_head']), got '[lm_head]'")


def test_unknown_recipe_and_bad_key_list_the_valid_ones(capsys):
    assert launch.main(["no_such_recipe", "--yes"]) == 2
    assert "valid recipes: " in capsys.readouterr().err
    assert launch.main(["smollm2_135m_import_cpu", "no_such_field=1", "--yes"]) == 2
    err = capsys.readouterr().err
    assert "the recipe has no field 'no_such_field'; its fields: dtype, evaluation, hf_export_path" in err
    assert launch.main(["smollm2_135m_import_cpu", "evaluation.num_sequences=abc", "--dryrun"]) == 2
    assert "expected a value of type int, got 'abc'" in capsys.readouterr().err
    assert launch.main(["smollm2_135m_import_cpu", "evaluation.num_sequences=0", "--dryrun"]) == 2
    assert "num_sequences=0 must be at least 1" in capsys.readouterr().err
    # NeMo-Run's syntax, this launcher's earlier one, and the flag
    for executor in (["run.executor=nowhere"], ["executor=nowhere"], ["--executor", "nowhere"]):
        assert launch.main(["smollm2_135m_import_cpu", *executor, "--yes"]) == 2
        assert capsys.readouterr().err.strip() == (
            "error: executor 'nowhere' is unknown; valid executors: dgxcloud, kubeflow, lepton, local, skypilot, "
            "slurm, torchrun.")


def test_recipe_names_follow_the_rule():
    assert recipe_name("smollm2_135m", "ptq", "cpu", "fp8") == "smollm2_135m_ptq_fp8_cpu"
    with pytest.raises(ValueError, match="stage='quantise'"):
        recipe_name("smollm2_135m", "quantise", "cpu")
    assert parse_recipe_name("llama31_8b_ptq_fp8_8gpu_h100_bf16") == {
        "model": "llama31_8b", "stage": "ptq", "variant": "fp8", "hardware": "8gpu_h100_bf16"}
    named = [name for name in llm.RECIPES if not name.endswith("_recipe")]
    assert len(named) >= 5
    for name in named:
        parts = parse_recipe_name(name)
        assert recipe_name(parts["model"], parts["stage"], parts["hardware"], parts["variant"]) == name


def test_commands_do_not_open_with_missing_gpu_extension_warnings():
    """megatron-core's "Transformer Engine and Apex are not installed" warnings (six of them)
    are not shown: the CPU path never needs those extensions."""
    listed = subprocess.run([sys.executable, "launch.py", "--list"], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert listed.returncode == 0 and "speculative_recipe" in listed.stdout
    assert "Apex" not in listed.stderr and "Transformer Engine" not in listed.stderr, listed.stderr


def test_nemo_llm_namespace_is_registered():
    nemo = Path(sys.executable).parent / "nemo"
    result = subprocess.run([str(nemo), "llm", "--help"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    for command in ("import_ckpt", "export_ckpt", "evaluate", "ptq", "prune", "finetune", "distill", "speculative"):
        assert command in result.stdout
    dry = subprocess.run([str(nemo), "llm", "import_ckpt", "--factory", "smollm2_135m_import_cpu",
                          "output_path=/tmp/nowhere", "--dryrun", "--yes"], capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stdout[-2000:] + dry.stderr[-2000:]
    assert "/tmp/nowhere" in dry.stdout
    assert not Path("/tmp/nowhere").exists()
    # the executor in NeMo-Run's syntax, as launch.py and the experiments take it
    dry = subprocess.run([str(nemo), "llm", "distill", "--factory", "smollm2_135m_distill_depth20_cpu",
                          "training.max_steps=7", "run.executor=slurm", "run.executor.partition=batch", "--dryrun",
                          "--yes"], capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stdout[-2000:] + dry.stderr[-2000:]
    assert "max_steps=7" in dry.stdout and "SlurmExecutor" in dry.stdout and "partition='batch'" in dry.stdout
    dry = subprocess.run([str(nemo), "llm", "speculative", "--factory", "smollm2_135m_speculative_eagle3_cpu",
                          "speculative_config.num_draft_tokens=3", "--dryrun", "--yes"], capture_output=True,
                         text=True, timeout=300)
    assert dry.returncode == 0, dry.stdout[-2000:] + dry.stderr[-2000:]
    assert "num_draft_tokens=3" in dry.stdout


def test_launch_runs_a_real_local_job_and_reports_failure(tiny_hf_models, tmp_path, capsys):
    """Through NeMo-Run's LocalExecutor (a separate process): success exits 0 with the
    artifact in place; a failing task exits 1 and names its log directory."""
    export = tmp_path / "fp8"
    code = launch.main(["ptq_recipe", f"model_path={tiny_hf_models['llama']}", f"export_config.path={export}",
                        "quantization_config.calibration_dataset_size=4", "quantization_config.calibration_seq_len=32",
                        "--yes"])
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    assert (export / "hf_quant_config.json").is_file() and (tmp_path / "fp8_native" / "manifest.json").is_file()
    assert "ptq_recipe: SUCCEEDED" in out

    code = launch.main(["ptq_recipe", f"model_path={tmp_path / 'missing'}", f"export_config.path={tmp_path / 'never'}",
                        "--yes"])
    captured = capsys.readouterr()
    assert code == 1
    assert "ptq_recipe: FAILED (logs: " in captured.out
    # the summary ends with the task's own error, not a traceback or NeMo-Run's boilerplate
    assert captured.err.strip().splitlines()[-1] == (
        f"error: ptq_recipe failed: model path '{tmp_path / 'missing'}': found nothing; give a nemo-optim checkpoint "
        f"directory, a NeMo 2 checkpoint directory, a Hugging Face model directory, a .gguf file, or one of the "
        f"embedded models: "
        f"smollm2-135m-instruct. Hub ids are not downloaded.")
    assert not (tmp_path / "never").exists()


def test_experiment_tasks_are_small_edits_of_recipes():
    from experiments import smollm2_ptq_formats

    tasks = smollm2_ptq_formats.tasks()
    assert set(tasks) == {"fp8", "int8_sq", "int4_awq"}
    for name, task in tasks.items():
        assert task.quantization_config.calibration_dataset_size == 16
        assert task.quantization_config.algorithm == name
        serializer = run.core.serialization.zlib_json.ZlibJSONSerializer()
        assert serializer.deserialize(serializer.serialize(task)) == task


def test_a_finished_output_is_not_replaced_unless_asked(tiny_hf_models, tmp_path, capsys):
    """Recipes do not overwrite: an existing export is refused before anything runs (one line,
    exit 2, the directory untouched); overwrite=True on the command line lets it through."""
    export = tmp_path / "fp8"
    export.mkdir()
    (export / "keep.txt").write_text("finished\n")
    arguments = ["ptq_recipe", f"model_path={tiny_hf_models['llama']}", f"export_config.path={export}"]
    assert launch.main(arguments + ["--yes"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: ptq_recipe: export_path='{export}' exists; pass overwrite=True to replace it, or choose "
        f"another path.")
    assert [p.name for p in export.iterdir()] == ["keep.txt"]
    assert launch.main(arguments + ["overwrite=True", "--dryrun"]) == 0
    for name, recipe in llm.RECIPES.items():
        assert not recipe().__arguments__.get("overwrite"), name


def test_the_recipes_directory_installs_under_a_project_specific_name():
    """`recipes/` installs as `nemo_optim_recipes` (torchtune installs a top-level `recipes`), and
    every package of the core library is in pyproject's explicit list."""
    import sys
    import tomllib
    from pathlib import Path

    import nemo_optim_recipes.llm  # noqa: F401  (what `nemo llm` imports)

    root = Path(__file__).resolve().parents[1]
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    library = {".".join(p.parent.relative_to(root).parts) for p in (root / "nemo_optim").rglob("__init__.py")}
    assert sorted(setuptools["packages"]) == sorted(library | {"nemo_optim_recipes"})
    assert setuptools["package-dir"] == {"nemo_optim_recipes": "recipes"}
    assert Path(nemo_optim_recipes.__file__).resolve().parent == root / "recipes"
    assert "recipes" not in sys.modules  # nothing imports the directory under its bare name
