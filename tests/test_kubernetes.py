"""Kubernetes TrainJobs checked against the Kubeflow Trainer API, with no cluster: every recipe's
TrainJob (NeMo-Run's own dry run, GPU and CPU settings) fits the pinned `kubeflow-trainer-api`
models and what the API server would accept, and a wrong executor setting is refused by
launch.py before anything is submitted or written, in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import fiddle as fdl
import nemo_run as run
import pytest
import yaml

import launch
from nemo_optim_recipes import kubernetes
from nemo_optim_recipes.executors import EXECUTORS
from nemo_optim_recipes.launching import all_recipes, executor_with_overrides, rendered_job

REPO = Path(__file__).resolve().parents[1]
GPU = ["gpus_per_node=8", "num_nodes=2", "image=registry.example/nemo-optim:1", "namespace=llm"]
CPU = ["cpu=16", "memory=64Gi"]


@pytest.fixture
def empty_nemorun_home(tmp_path):
    """NeMo-Run's home (experiments, job records) as a directory that does not exist yet."""
    home = tmp_path / "nemo_run_home"
    previous = run.config.get_nemorun_home()
    run.config.set_nemorun_home(str(home))
    yield home
    run.config.set_nemorun_home(previous)


def _kubeflow(overrides: list[str]):
    return fdl.build(executor_with_overrides(EXECUTORS["kubeflow"], overrides))


def test_the_models_are_the_trainer_api_nemo_run_renders():
    """NeMo-Run's TrainJob puts pod settings in spec.podTemplateOverrides[].{targetJobs, metadata,
    spec}: Trainer v2.1's API, which both legs pin."""
    from kubeflow_trainer_api.models import TrainerV1alpha1PodTemplateOverride, TrainerV1alpha1TrainJobSpec
    from nemo_run.core.execution import kubeflow as nemo_run_kubeflow

    assert kubernetes.api_version() == "2.1.0"
    for leg in ("previous", "current"):
        assert "kubeflow-trainer-api==2.1.0" in (REPO / "requirements" / f"{leg}-constraints.txt").read_text()
        assert "kubeflow-trainer-api" in (REPO / "requirements" / f"{leg}.txt").read_text()
    rendered = f"{nemo_run_kubeflow._TRAINJOB_GROUP}/{nemo_run_kubeflow._TRAINJOB_VERSION}"
    assert rendered == kubernetes.TRAINJOB_API_VERSION
    assert TrainerV1alpha1TrainJobSpec.model_fields["pod_template_overrides"].alias == "podTemplateOverrides"
    assert {"targetJobs", "metadata", "spec"} <= {
        info.alias or name for name, info in TrainerV1alpha1PodTemplateOverride.model_fields.items()}


@pytest.mark.parametrize("setting", ["gpu", "cpu"])
@pytest.mark.parametrize("recipe", sorted(all_recipes()))
def test_every_recipe_trainjob_fits_the_trainer_api(recipe, setting, kubeconfig):
    executor = _kubeflow(GPU if setting == "gpu" else CPU)
    task = all_recipes()[recipe]()
    # what NeMo-Run's Kubeflow scheduler would submit (its own dry run)
    manifest = yaml.safe_load(rendered_job(task, executor, recipe))
    kubernetes.check_manifest(manifest)
    kubernetes.check_trainjob(executor, task, recipe)
    # the pre-launch check renders the same TrainJob, with the task's config inline instead of in a file
    checked = kubernetes.trainjob_manifest(executor, task, recipe)
    for body in (manifest, checked):
        body["metadata"]["name"] = "-"
        body["spec"]["trainer"]["command"][-1] = "<config>"
    assert checked == manifest

    trainer = manifest["spec"]["trainer"]
    assert manifest["spec"]["runtimeRef"] == {"name": "torch-distributed"}  # a ClusterTrainingRuntime, by default
    if setting == "gpu":
        assert (trainer["numNodes"], trainer["numProcPerNode"]) == (2, 8)
        assert trainer["resourcesPerNode"]["limits"] == trainer["resourcesPerNode"]["requests"] == {
            "nvidia.com/gpu": "8"}
    else:
        assert (trainer["numNodes"], trainer["numProcPerNode"]) == (1, 1)
        assert trainer["resourcesPerNode"]["limits"] == {"cpu": "16", "memory": "64Gi"}


def test_the_defaults_and_a_claim_fit(kubeconfig):
    for overrides in ([], ["pvc=llm-results", "pvc_path=/results"],
                      ["tolerations=[{'key': 'nvidia.com/gpu', 'operator': 'Exists', 'effect': 'NoSchedule'}]",
                       "extra_resource_limits={'nvidia.com/mig-1g.10gb': '1', 'rdma/ib': '1'}",
                       "extra_resource_requests={'nvidia.com/mig-1g.10gb': '1', 'rdma/ib': '1'}"]):
        kubernetes.check_trainjob(_kubeflow(overrides), all_recipes()["ptq_recipe"](), "ptq_recipe")
    # other executors are not Kubernetes jobs
    kubernetes.check_trainjob(fdl.build(EXECUTORS["local"]()), None)


@pytest.mark.parametrize("overrides, field, value, fix", [
    (["num_nodes=-1"], "spec.trainer.numNodes (from run.executor.num_nodes)", "-1", "num_nodes=N with N >= 1"),
    (["num_nodes=0"], "spec.trainer.numNodes (from run.executor.num_nodes)", "0", "num_nodes=N with N >= 1"),
    (["extra_resource_limits={'nvidia.com/gpus': '8'}"],
     "spec.trainer.resourcesPerNode.limits (from run.executor.extra_resource_limits)", "'nvidia.com/gpus'",
     "did you mean 'nvidia.com/gpu'?"),
    (["extra_resource_limits={'gpu': '8'}"], "resourcesPerNode.limits", "'gpu'", "e.g. 'nvidia.com/gpu'"),
    (["extra_resource_limits={'example.com/widget': '0.5'}"], "limits['example.com/widget']", "'0.5'",
     "give an integer"),
    (["memory=128GB"], "spec.trainer.resourcesPerNode.limits['memory'] (from run.executor.memory or memory_limits)",
     "'128GB'", "write a number with an optional suffix"),
    (["cpu=-2"], "limits['cpu']", "'-2'", "give a quantity >= 0"),
    (["gpus_per_node=8", "extra_resource_requests={'nvidia.com/gpu': '4'}"], "requests['nvidia.com/gpu']", "'4'",
     "make the request and the limit equal"),
    (["cpu_requests=32", "cpu_limits=16"], "requests['cpu']", "'32'", "request at most the limit"),
    (["namespace=LLM"], "metadata.namespace (from run.executor.namespace)", "'LLM'", "use lowercase letters"),
    (["nprocs_per_node=0"], "spec.trainer.numProcPerNode", "0", "N >= 1"),
    (["runtime_ref=Torch_Distributed"], "spec.runtimeRef.name (from run.executor.runtime_ref)",
     "'Torch_Distributed'", "use lowercase letters"),
    (["container_kwargs={'numNode': 2}"], "spec.trainer (from run.executor.container_kwargs)", "'numNode'",
     "did you mean 'numNodes'?"),
    (["container_kwargs={'image': 7}"], "spec.trainer.image", "7", "must be a value of type str"),
    (["spec_kwargs={'runtimeRef': {'name': 'torch-distributed', 'kind': 'JobSet'}}"], "spec.runtimeRef.kind",
     "'JobSet'", "ClusterTrainingRuntime, TrainingRuntime"),
    (["pod_spec_overrides={'nodeSelectors': {'a': 'b'}}"],
     "spec.podTemplateOverrides[0].spec (from run.executor.pod_spec_overrides)", "'nodeSelectors'",
     "did you mean 'nodeSelector'?"),
    (["env_vars={'1BAD': 'x'}"], "spec.trainer.env[0].name", "'1BAD'", "not starting with a digit"),
])
def test_a_wrong_setting_is_refused_in_one_line(overrides, field, value, fix, kubeconfig):
    with pytest.raises(kubernetes.TrainJobError) as refused:
        kubernetes.check_trainjob(_kubeflow(overrides), all_recipes()["ptq_recipe"](), "ptq_recipe")
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith("TrainJob ") and field in message and f": {value} " in message and fix in message
    assert message.endswith("(Kubeflow Trainer API 2.1.0, trainer.kubeflow.org/v1alpha1)")
    assert isinstance(refused.value, ValueError)


@pytest.mark.parametrize("override, expected", [
    ("run.executor.extra_resource_limits={'nvidia.com/gpus': '8'}",
     "error: ptq_recipe: TrainJob spec.trainer.resourcesPerNode.limits (from run.executor.extra_resource_limits): "
     "'nvidia.com/gpus' is not a known resource name (a pod asking for one no node offers is never scheduled); "
     "did you mean 'nvidia.com/gpu'?"),
    ("run.executor.num_nodes=-1",
     "error: ptq_recipe: TrainJob spec.trainer.numNodes (from run.executor.num_nodes): -1 must be at least 1; "
     "set run.executor.num_nodes=N with N >= 1"),
    ("run.executor.memory=128GB",
     "error: ptq_recipe: TrainJob spec.trainer.resourcesPerNode.limits['memory'] (from run.executor.memory or "
     "memory_limits): '128GB' is not a Kubernetes quantity; write a number"),
])
def test_launch_refuses_a_wrong_setting_before_submitting(override, expected, kubeconfig, empty_nemorun_home,
                                                          tmp_path, capsys):
    export = tmp_path / "fp8"
    code = launch.main(["ptq_recipe", f"export_config.path={export}", "run.executor=kubeflow", override, "--yes"])
    captured = capsys.readouterr()
    assert code == 2, captured.out[-2000:] + captured.err[-2000:]
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), captured.err
    assert captured.out == ""
    assert not empty_nemorun_home.exists() and not export.exists()  # nothing submitted, nothing written


def test_launch_py_refuses_in_its_own_process(kubeconfig, tmp_path):
    """The same through launch.py as a command: exit 2, the one line last, nothing written."""
    home = tmp_path / "nemo_run_home"
    result = subprocess.run(
        [sys.executable, str(REPO / "launch.py"), "ptq_recipe", "run.executor=kubeflow", "run.executor.gpus_per_node=8",
         "run.executor.num_nodes=2", "run.executor.memory=1.5TB", "--yes"], cwd=tmp_path, capture_output=True,
        text=True, stdin=subprocess.DEVNULL, timeout=600,
        env={**os.environ, "KUBECONFIG": str(kubeconfig), "NEMORUN_HOME": str(home)})
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(
        "error: ptq_recipe: TrainJob spec.trainer.resourcesPerNode.limits['memory'] (from run.executor.memory or "
        "memory_limits): '1.5TB' is not a Kubernetes quantity")
    assert not home.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["kubeconfig"]


def test_launch_dryrun_of_a_two_node_job_is_checked_and_printed(kubeconfig, capsys):
    code = launch.main(["ptq_recipe", "run.executor=kubeflow", *[f"run.executor.{item}" for item in GPU], "--dryrun"])
    captured = capsys.readouterr()
    assert code == 0, captured.err[-2000:]
    manifest = yaml.safe_load(captured.out[captured.out.index("apiVersion: trainer.kubeflow.org"):])
    kubernetes.check_manifest(manifest)
    assert manifest["spec"]["trainer"]["numNodes"] == 2


def test_nemo_llm_refuses_a_wrong_setting_before_submitting(kubeconfig, tmp_path):
    nemo = Path(sys.executable).parent / "nemo"
    result = subprocess.run([str(nemo), "llm", "ptq", "--factory", "ptq_recipe", "run.executor=kubeflow",
                             "run.executor.num_nodes=-1", "--dryrun", "--yes"], cwd=tmp_path, capture_output=True,
                            text=True, stdin=subprocess.DEVNULL, timeout=600,
                            env={**os.environ, "KUBECONFIG": str(kubeconfig),
                                 "NEMORUN_HOME": str(tmp_path / "nemo_run_home")})
    assert result.returncode != 0
    assert "TrainJob spec.trainer.numNodes (from run.executor.num_nodes): -1 must be at least 1" in result.stderr
