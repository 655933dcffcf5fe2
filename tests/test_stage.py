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
from nemo_optim.stage import StageArgumentError, stage_runtime
from nemo_optim_recipes.llm import STAGES

# the smallest arguments of each stage, with every output at `{out}`
OUTPUT_ARGUMENTS = {
    "import_ckpt": lambda out: dict(source=SMOLLM2, output_path=out),
    "export_ckpt": lambda out: dict(path=SMOLLM2, output_path=out),
    "evaluate": lambda out: dict(model_path=SMOLLM2, output_path=out),
    "ptq": lambda out: dict(model_path=SMOLLM2, export_config=ExportConfig(path=out)),
    "prune": lambda out: dict(nemo_checkpoint=SMOLLM2, save_path=out,
                              pruning_config=PruningConfig(drop_layers=[30])),
    "finetune": lambda out: dict(model_path=SMOLLM2, output_path=out),
    "distill": lambda out: dict(student_model_path=SMOLLM2, teacher_model_path=SMOLLM2,
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
        distill(student_model_path="a", teacher_model_path="b", output_path=str(tmp_path / "out"), num_nodes=0)
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
