"""Executors: every factory builds, cluster profiles come from the environment, a real one-node
Slurm runs a stage (and reports a failing one), and the Kubeflow TrainJob manifest is the right
one (its command, run here, does the job)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import fiddle as fdl
import nemo_run as run
import pytest
import yaml

from nemo_optim_recipes import llm
from nemo_optim_recipes.executors import EXECUTORS
from nemo_optim_recipes.launching import executor_with_overrides, rendered_job

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(EXECUTORS))
def test_every_executor_builds_and_serializes(name, kubeconfig):
    config = EXECUTORS[name]()
    serializer = run.core.serialization.zlib_json.ZlibJSONSerializer()
    assert serializer.deserialize(serializer.serialize(config)) == config
    if name == "skypilot":
        pytest.importorskip("sky", reason="nemo_run[skypilot] is not installed")
    executor = fdl.build(config)
    assert isinstance(executor, run.Executor)


def test_cluster_profile_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("NEMO_OPTIM_SLURM_ACCOUNT", "llm-team")
    monkeypatch.setenv("NEMO_OPTIM_SLURM_PARTITION", "batch")
    monkeypatch.setenv("NEMO_OPTIM_SLURM_GPUS_PER_NODE", "8")
    monkeypatch.setenv("NEMO_OPTIM_SLURM_NTASKS_PER_NODE", "8")
    monkeypatch.setenv("NEMO_OPTIM_SLURM_CONTAINER_IMAGE", "nvcr.io/nvidia/nemo:25.11")
    monkeypatch.setenv("NEMO_OPTIM_SLURM_CONTAINER_MOUNTS", "/lustre/models:/models,/lustre/results:/results")
    monkeypatch.setenv("NEMO_OPTIM_SLURM_HOST", "login.cluster.example")
    executor = fdl.build(executor_with_overrides(EXECUTORS["slurm"], ["partition=interactive", "time=00:30:00"]))
    assert (executor.account, executor.partition, executor.gpus_per_node, executor.time) == (
        "llm-team", "interactive", 8, "00:30:00")
    assert executor.container_mounts == ["/lustre/models:/models", "/lustre/results:/results"]
    assert isinstance(executor.tunnel, run.SSHTunnel) and executor.tunnel.host == "login.cluster.example"
    assert isinstance(executor.packager, run.GitArchivePackager)  # a remote cluster gets the committed code

    monkeypatch.setenv("NEMO_OPTIM_SLURM_NODES", "two")
    with pytest.raises(ValueError, match="NEMO_OPTIM_SLURM_NODES='two' must be an integer"):
        EXECUTORS["slurm"]()


def test_cpu_jobs_start_with_glibcs_thread_cache_off(monkeypatch):
    """glibc reads GLIBC_TUNABLES only when a process starts, so the executors set it for CPU jobs
    (`nemo_optim.cpu.cpu_allocator_env`: without the cache, freed activations' heap is reused instead of
    growing); a user's own tunables are kept, and their own cache setting wins."""
    from nemo_optim.cpu import cpu_allocator_env

    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    off = "glibc.malloc.tcache_count=0"
    for name in ("local", "torchrun"):
        assert fdl.build(EXECUTORS[name]()).env_vars["GLIBC_TUNABLES"] == off
    assert fdl.build(EXECUTORS["slurm"](ntasks_per_node=2)).env_vars == {"OMP_NUM_THREADS": "1", "GLIBC_TUNABLES": off}
    # host memory is not the limit there
    assert "GLIBC_TUNABLES" not in fdl.build(EXECUTORS["slurm"](gpus_per_node=8)).env_vars

    assert cpu_allocator_env({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}) == {
        "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:" + off}
    assert cpu_allocator_env({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=7"}) == {
        "GLIBC_TUNABLES": "glibc.malloc.tcache_count=7"}


def _launch(*args: str, **env: str) -> subprocess.CompletedProcess:
    """launch.py in its own process (NeMo-Run's local tunnel reads stdin, which pytest replaces)."""
    import os

    return subprocess.run([sys.executable, str(REPO / "launch.py"), *args], cwd=REPO, capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, env={**os.environ, **env}, timeout=900)


def test_slurm_dryrun_prints_the_sbatch_script():
    result = _launch("llama31_8b_ptq_fp8_8gpu_h100_bf16", "run.executor=slurm", "run.executor.partition=batch",
                     "run.executor.gpus_per_node=8", "run.executor.ntasks_per_node=8",
                     "run.executor.container_image=nvcr.io/nvidia/nemo:25.11", "--dryrun",
                     NEMO_OPTIM_SLURM_ACCOUNT="llm-team")
    out = result.stdout
    assert result.returncode == 0, result.stderr[-3000:]
    assert "#SBATCH --account=llm-team" in out and "#SBATCH --partition=batch" in out
    assert "--container-image nvcr.io/nvidia/nemo:25.11" in out
    assert "--nproc-per-node 8" in out and "nemo_run.core.runners.fdl_runner" in out


def test_kubeflow_trainjob_manifest_and_its_command(kubeconfig, tiny_hf_models, tmp_path):
    partial = launch_partial = llm.RECIPES["ptq_recipe"]()
    from nemo_optim_recipes.launching import apply_overrides

    export = tmp_path / "fp8"
    launch_partial = apply_overrides(partial, [f"model_path={tiny_hf_models['llama']}", f"export_config.path={export}",
                                               "quantization_config.calibration_dataset_size=4",
                                               "quantization_config.calibration_seq_len=32"])
    executor = fdl.build(executor_with_overrides(EXECUTORS["kubeflow"], [
        "image=registry.example/nemo-optim:1", "namespace=llm", "gpus_per_node=8", "cpu=16", "memory=128Gi"]))
    manifest = yaml.safe_load(rendered_job(launch_partial, executor, "ptq"))
    assert manifest["kind"] == "TrainJob" and manifest["metadata"]["namespace"] == "llm"
    trainer = manifest["spec"]["trainer"]
    assert trainer["image"] == "registry.example/nemo-optim:1"
    assert trainer["numNodes"] == 1 and trainer["numProcPerNode"] == 8
    assert trainer["resourcesPerNode"]["limits"] == {"cpu": "16", "memory": "128Gi", "nvidia.com/gpu": "8"}
    command = trainer["command"]
    assert command[:4] == ["python", "-m", "nemo_run.core.runners.fdl_runner", "-n"]

    # the pod's command, run here, performs the stage
    result = subprocess.run([sys.executable, *command[1:]], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (export / "hf_quant_config.json").is_file()

    # with a claim: volumes, mounts, cache env, and the command is the launch script on the claim
    claimed = fdl.build(executor_with_overrides(EXECUTORS["kubeflow"], ["pvc=llm-results", "pvc_path=/results"]))
    manifest = yaml.safe_load(rendered_job(launch_partial, claimed, "SmolLM2_ptq"))
    assert manifest["metadata"]["name"] == "smollm2-ptq"  # a Kubernetes name (RFC 1123)
    override = manifest["spec"]["podTemplateOverrides"][0]["spec"]
    assert override["volumes"] == [{"name": "results", "persistentVolumeClaim": {"claimName": "llm-results"}}]
    assert override["containers"][0]["volumeMounts"] == [{"name": "results", "mountPath": "/results"}]
    assert {"name": "NEMO_OPTIM_CACHE", "value": "/results/.cache"} in manifest["spec"]["trainer"]["env"]
    assert manifest["spec"]["trainer"]["command"][0] == "/bin/bash"
    assert (manifest["spec"]["trainer"]["command"][1].startswith("/results/nemo_run/")
            and manifest["spec"]["trainer"]["command"][1].endswith("/launch.sh"))


# --- a real Slurm ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def slurm_cluster(tmp_path_factory):
    import slurm_cluster as cluster_module

    try:
        cluster = cluster_module.start(tmp_path_factory.mktemp("slurm"))
    except cluster_module.SlurmUnavailable as error:
        pytest.skip(f"no Slurm here: {error}")
    yield cluster
    cluster.stop()


def _sacct_states() -> dict[str, str]:
    result = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,JobName,State"], capture_output=True, text=True,
                            check=True)
    return {line.split("|")[0]: line.split("|")[2] for line in result.stdout.splitlines() if line}


@pytest.mark.slurm
def test_slurm_runs_a_stage_and_reports_a_failing_one(slurm_cluster, tiny_hf_models, tmp_path):
    export = tmp_path / "fp8"
    result = _launch("ptq_recipe", f"model_path={tiny_hf_models['llama']}", f"export_config.path={export}",
                     "quantization_config.calibration_dataset_size=4", "quantization_config.calibration_seq_len=32",
                     "run.executor=slurm", "run.executor.partition=debug", "--yes")
    out = result.stdout
    assert result.returncode == 0, out[-3000:] + result.stderr[-3000:]
    assert (export / "hf_quant_config.json").is_file() and (tmp_path / "fp8_native" / "manifest.json").is_file()
    assert "ptq_recipe: SUCCEEDED" in out
    assert "COMPLETED" in _sacct_states().values()

    result = _launch("ptq_recipe", f"model_path={tmp_path / 'missing'}", f"export_config.path={tmp_path / 'never'}",
                     "--executor", "slurm", "--yes")
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "ptq_recipe: FAILED (logs: " in result.stdout
    # the task's own error, read from the Slurm job's log, is the launch's last line
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"error: ptq_recipe failed: model path '{tmp_path / 'missing'}': found nothing; give a nemo-optim checkpoint")
    assert "FAILED" in _sacct_states().values()
    assert not (tmp_path / "never").exists()
