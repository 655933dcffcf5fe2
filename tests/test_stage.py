"""Every stage entry reads the same way (nemo_optim.stage): a pre-launch check attached to it,
outputs refused before anything loads, the launch layout checked with the stage's own field
names. Each stage is called for real here; the refusals happen before a model is loaded."""

from __future__ import annotations

import inspect

import pytest

from nemo_optim.errors import OutputExistsError
from nemo_optim.models.hf import SMOLLM2
from nemo_optim.pruning.config import PruningConfig
from nemo_optim.quantization.config import ExportConfig
from nemo_optim.stage import ALIASES, OUTPUT_FIELDS, StageArgumentError, output_fields, stage_runtime
from nemo_optim_recipes.llm import STAGES

# the smallest arguments of each stage, with every output at `{out}`
OUTPUT_ARGUMENTS = {
    "import_ckpt": lambda out: dict(model_path=SMOLLM2, output_path=out),
    "export_ckpt": lambda out: dict(model_path=SMOLLM2, output_path=out),
    "evaluate": lambda out: dict(model_path=SMOLLM2, output_path=out),
    "ptq": lambda out: dict(model_path=SMOLLM2, export_path=out),
    "prune": lambda out: dict(model_path=SMOLLM2, output_path=out,
                              pruning_config=PruningConfig(drop_layers=[30])),
    "finetune": lambda out: dict(model_path=SMOLLM2, output_path=out),
    "distill": lambda out: dict(model_path=SMOLLM2, teacher_model_path=SMOLLM2,
                                output_path=out),
    "speculative": lambda out: dict(model_path=SMOLLM2, output_path=out),
}


def test_the_stage_list_is_the_one_the_cli_serves():
    assert sorted(stage.__name__ for stage in STAGES) == sorted(OUTPUT_ARGUMENTS)
    for stage in STAGES:
        assert stage.__module__.startswith("nemo_optim.stages."), stage.__module__
        parameters = inspect.signature(stage).parameters
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters.values()), stage.__name__
        assert parameters["overwrite"].default is False, stage.__name__
        assert callable(stage.check_arguments), stage.__name__


@pytest.mark.parametrize("name", sorted(OUTPUT_ARGUMENTS))
def test_every_stage_refuses_an_existing_output_before_loading_anything(name, tmp_path):
    stage = next(s for s in STAGES if s.__name__ == name)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("an earlier run's result\n")
    with pytest.raises(OutputExistsError, match=r"existing' exists; pass overwrite=True or choose another path\.$"):
        stage(**OUTPUT_ARGUMENTS[name](str(existing)))
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["existing", "keep.txt"]


def test_the_launch_layout_is_checked_with_the_stages_own_field_names(tmp_path):
    with pytest.raises(StageArgumentError, match=r"^devices x num_nodes = 2 but 1 processes were launched; launch with "
                                                 r"torchrun --nproc_per_node 2 \(or set devices to match\)\.$"):
        with stage_runtime(devices=2):
            pass
    with pytest.raises(StageArgumentError, match=r"^calibration_tp=0 must be a positive integer\.$"):
        with stage_runtime(0, 1, tp_field="calibration_tp"):
            pass
    ptq = next(s for s in STAGES if s.__name__ == "ptq")
    with pytest.raises(StageArgumentError, match=r"^calibration_pp=0 must be a positive integer\.$"):
        ptq(model_path=SMOLLM2, export_config=ExportConfig(path=str(tmp_path / "out")), calibration_pp=0)
    distill = next(s for s in STAGES if s.__name__ == "distill")
    with pytest.raises(StageArgumentError, match=r"^num_nodes=0 must be a positive integer\.$"):
        distill(model_path="a", teacher_model_path="b", output_path=str(tmp_path / "out"), num_nodes=0)
    assert list(tmp_path.iterdir()) == []


def test_a_stage_leaves_the_imported_objects_out_of_full_collections_and_collects_its_own():
    """Each full garbage collection walked the ~600k objects of the imported libraries (0.35 s in
    the middle of SmolLM2's ptq stage): inside a stage they are frozen; what the stage creates is
    still collected, and nothing stays frozen afterwards."""
    import gc
    import weakref

    class Node:
        pass

    assert gc.get_freeze_count() == 0
    before = Node()
    before.self = before  # a cycle from before the stage: frozen inside, collected again after
    seen_before = weakref.ref(before)
    del before
    with stage_runtime():
        assert gc.get_freeze_count() >= 100_000  # torch, megatron-core and ModelOpt are imported
        gc.collect()
        assert seen_before() is not None
        inside = Node()
        inside.self = inside
        seen_inside = weakref.ref(inside)
        del inside
        gc.collect()
        assert seen_inside() is None
    assert gc.get_freeze_count() == 0
    gc.collect()
    assert seen_before() is None


# files a stage reads that are not a model
OTHER_INPUTS = {"tokenizer_path", "distillation_config_path", "scores_path"}


def test_one_name_per_concept_in_every_stage():
    """The model a stage reads is `model_path` (another one `<role>_model_path`), what it writes
    `output_path` (a second artifact `export_path` / `hf_export_path`): the overwrite check finds
    the outputs in the signature. NeMo 2's names appear only as aliases of a current name."""
    for stage in STAGES:
        parameters = inspect.signature(stage).parameters
        assert "model_path" in parameters, stage.__name__
        assert output_fields(stage), stage.__name__
        for name in parameters:
            if name in ALIASES:
                assert ALIASES[name] in parameters and parameters[name].default is None, (stage.__name__, name)
            elif name.endswith(("_path", "_dir")) and name != "run_dir":
                assert name in OUTPUT_FIELDS or name.endswith("model_path") or name in OTHER_INPUTS, (
                    stage.__name__, name)


def test_nemo2_names_are_taken_as_the_current_ones_with_one_line(tmp_path, capsys):
    prune = next(s for s in STAGES if s.__name__ == "prune")
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(OutputExistsError, match=r"^output_path='.*existing' exists"):
        prune(nemo_checkpoint=SMOLLM2, save_path=str(existing), pruning_config=PruningConfig(drop_layers=[30]))
    notes = capsys.readouterr().err.strip().splitlines()
    assert notes == [f"note: nemo_checkpoint is NeMo 2's name for model_path, which is current: model_path={SMOLLM2!r}",
                     f"note: save_path is NeMo 2's name for output_path, which is current: "
                     f"output_path={str(existing)!r}"]
    ptq = next(s for s in STAGES if s.__name__ == "ptq")
    with pytest.raises(OutputExistsError, match=r"^export_path='.*existing' exists"):
        ptq(model_path=SMOLLM2, export_config=ExportConfig(path=str(existing), export_format="trtllm"))
    assert "export_config.path is NeMo 2's name for export_path" in capsys.readouterr().err
    # a recipe sets the current name; the alias given over it wins, and the note says so
    with pytest.raises(OutputExistsError, match=r"^output_path='.*existing' exists"):
        prune(model_path=SMOLLM2, save_path=str(existing), output_path=str(tmp_path / "recipe"),
              pruning_config=PruningConfig(drop_layers=[30]))
    assert f"output_path={str(existing)!r} (instead of {str(tmp_path / 'recipe')!r})" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]


def _dataclasses_in(annotation) -> list[type]:
    import dataclasses
    import typing

    if dataclasses.is_dataclass(annotation):
        return [annotation]
    return [found for argument in typing.get_args(annotation) for found in _dataclasses_in(argument)]


def test_annotations_nemo_runs_cli_parses_are_types_not_strings():
    """NeMo-Run's CLI reads the stage entries' annotations, and those of the config dataclasses they
    take, at run time: a module with `from __future__ import annotations` turns them into strings
    it cannot parse (`nemo llm ptq quantization_config.algorithm=fp8` would fail)."""
    import dataclasses

    seen = set()
    for stage in STAGES:
        configs = []
        for parameter in inspect.signature(stage).parameters.values():
            assert not isinstance(parameter.annotation, str), (stage.__name__, parameter.name)
            configs += _dataclasses_in(parameter.annotation)
        while configs:
            config = configs.pop()
            if config in seen:
                continue
            seen.add(config)
            for field in dataclasses.fields(config):
                assert not isinstance(field.type, str), (config.__qualname__, field.name, field.type)
                configs += _dataclasses_in(field.type)
    assert len(seen) >= 8  # every stage's configs were walked
