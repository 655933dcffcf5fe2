"""Two Slurm nodes on one machine (tests/slurm_cluster.py, `nodes=2`: each slurmd in its own
network and UTS namespace, node1 / node2 on a bridge) and real 2-node jobs through launch.py and
NeMo-Run's SlurmExecutor (torchrun, one process per node, gloo across the namespaces):

* distillation with data parallel 2 across the nodes ends where one process ends (same global
  batch: two micro-batches accumulated in one process, one per rank across the nodes);
* PTQ with calibration_tp=2 across the nodes exports what calibration_tp=2 on one node exports;
* a node's process SIGKILLed mid-run fails the job within a bound, the failing node's error is
  the launch's last line, and the same command run again resumes from the last checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# one shared run of the distillation: 20 steps of a tiny pair, the same global batch everywhere
STEPS = 20
DISTILL = ("training.global_batch_size=4", "training.micro_batch_size=2", "data.seq_length=32", "training.lr=3e-3",
           "training.warmup_steps=2", "training.log_interval=1", f"training.max_steps={STEPS}",
           f"training.val_check_interval={STEPS}", "training.num_val_sequences=4")
TWO_NODES = ("run.executor=slurm", "run.executor.nodes=2", "run.executor.partition=debug")


def test_a_multi_node_slurm_executor_runs_torchrun(monkeypatch):
    """One task per node on two nodes still needs torchrun: without it each node's task would run
    the stage alone, with no process group between them."""
    import fiddle as fdl
    import nemo_run as run

    from nemo_optim_recipes.executors import EXECUTORS

    monkeypatch.delenv("NEMO_OPTIM_SLURM_NODES", raising=False)
    assert fdl.build(EXECUTORS["slurm"]()).launcher is None
    executor = fdl.build(EXECUTORS["slurm"](nodes=2))
    assert isinstance(executor.get_launcher(), run.Torchrun) and (executor.nodes, executor.ntasks_per_node) == (2, 1)
    monkeypatch.setenv("NEMO_OPTIM_SLURM_NODES", "2")
    assert isinstance(fdl.build(EXECUTORS["slurm"]()).get_launcher(), run.Torchrun)


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    import slurm_cluster

    try:
        cluster = slurm_cluster.start(tmp_path_factory.mktemp("slurm2"), nodes=2)
    except slurm_cluster.SlurmUnavailable as error:
        pytest.skip(f"no two-node Slurm here: {error}")
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def nemo_run_home(tmp_path_factory):
    # (NeMo-Run rewrites paths containing "/nemo_run": not in this name)
    return tmp_path_factory.mktemp("nrhome")


def _launch_command(*args: str) -> list[str]:
    return [sys.executable, str(REPO / "launch.py"), *args, "--yes"]


def _launch_env(nemo_run_home: Path) -> dict[str, str]:
    # two "nodes" share this machine's cores: one thread per process
    return {**os.environ, "NEMORUN_HOME": str(nemo_run_home), "OMP_NUM_THREADS": "1"}


def _launch(nemo_run_home: Path, *args: str) -> subprocess.CompletedProcess:
    """launch.py in its own process (NeMo-Run's local tunnel reads stdin, which pytest replaces)."""
    return subprocess.run(_launch_command(*args), cwd=REPO, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          env=_launch_env(nemo_run_home), timeout=900)


def _jobs() -> dict[str, tuple[str, str]]:
    """Slurm job id -> (state, node list), allocations only."""
    result = subprocess.run(["sacct", "-X", "-n", "-P", "-o", "JobID,State,NodeList"], capture_output=True,
                            text=True, check=True)
    return {line.split("|")[0]: tuple(line.split("|")[1:]) for line in result.stdout.splitlines() if line}


def _task_log(launch_stdout: str, task: str) -> str:
    """The job's log (both nodes' torchrun agents and ranks write to it)."""
    log_dir = Path(re.search(rf"^{task}: \w+ \(logs: (.+)\)$", launch_stdout, re.M)[1])
    return "\n".join(path.read_text(errors="replace") for path in sorted(log_dir.glob("log-*.out")))


def _check_ran_on_both_nodes(log: str, job_state: tuple[str, str]) -> None:
    assert job_state[1] == "node[1-2]", job_state
    # rendezvous at node1's bridge address (NeMo-Run: `hostname --ip-address` on the first node),
    # one agent per node: node ranks 0 and 1, workers told to meet at node1
    endpoint = re.findall(r"rdzv_endpoint\s+: (\S+)", log)
    assert len(endpoint) == 2 and len(set(endpoint)) == 1 and re.fullmatch(r"10\.213\.\d+\.11:\d+", endpoint[0]), log
    assert sorted(re.findall(r"group_rank=(\d)", log)) == ["0", "1"]
    assert re.findall(r"master_addr=(\S+)", log) == ["node1", "node1"]


def _history(output: Path) -> list[dict]:
    metrics = output.parent / f"{output.name}_run" / "metrics.jsonl"
    return [json.loads(line) for line in metrics.read_text().splitlines()]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from nemo_optim import runtime
    from nemo_optim.models.loader import load_model

    with runtime.parallel_runtime():
        return {k: v.clone() for k, v in load_model(path).model.state_dict().items() if isinstance(v, torch.Tensor)}


@pytest.fixture(scope="module")
def kd_pair(tmp_path_factory, tiny_tokenizer):
    from tiny_models import make_tiny_hf_model

    root = tmp_path_factory.mktemp("kd_pair2")
    return (make_tiny_hf_model("llama", root / "teacher", tiny_tokenizer, seed=0),
            make_tiny_hf_model("llama", root / "student", tiny_tokenizer, seed=1))


def _distill_args(kd_pair, output: Path, *extra: str) -> tuple[str, ...]:
    teacher, student = kd_pair
    return ("distillation_recipe", f"model_path={student}", f"teacher_model_path={teacher}",
            f"output_path={output}", *DISTILL, *extra)


@pytest.fixture(scope="module")
def data_parallel_distillation(two_nodes, kd_pair, nemo_run_home, tmp_path_factory):
    """The distillation at data parallel 2, one process on each node, run to its end."""
    output = tmp_path_factory.mktemp("dp2") / "distilled"
    began = time.monotonic()
    result = _launch(nemo_run_home, *_distill_args(kd_pair, output, "num_nodes=2", "devices=1"), *TWO_NODES)
    seconds = time.monotonic() - began
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "distillation_recipe: SUCCEEDED" in result.stdout
    print(f"2-node distillation: {seconds:.1f} s")
    return output, result


@pytest.mark.slurm
def test_two_node_data_parallel_distillation_matches_one_process(data_parallel_distillation, kd_pair, tmp_path):
    output, result = data_parallel_distillation
    job = max(_jobs().items(), key=lambda item: int(item[0]))
    _check_ran_on_both_nodes(_task_log(result.stdout, "distillation_recipe"), job[1])
    from nemo_optim.training import newest_checkpoint

    # the final training checkpoint's layout: 2 processes, TP = PP = 1, so data parallel 2
    meta = json.loads((newest_checkpoint(output.parent / f"{output.name}_run") / "meta.json").read_text())
    assert meta["layout"] == {"world_size": 2, "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1}

    # the same recipe and overrides in one process: the global batch of 4 is two micro-batches of 2
    import fiddle as fdl

    from nemo_optim_recipes import llm
    from nemo_optim_recipes.launching import apply_overrides

    single = tmp_path / "single"
    began = time.monotonic()
    partial = apply_overrides(llm.RECIPES["distillation_recipe"](), list(_distill_args(kd_pair, single))[1:])
    fdl.build(partial)()
    print(f"one-process distillation: {time.monotonic() - began:.1f} s")

    expected, got = _history(single), _history(output)
    assert [(r["kind"], r["step"]) for r in got] == [(r["kind"], r["step"]) for r in expected]
    worst_loss = max(abs(have[key] - want[key]) / max(abs(want[key]), 1e-12)
                     for want, have in zip(expected, got) for key in ("loss", "logits_loss") if key in want)
    one, two = _weights(single), _weights(output)
    assert one.keys() == two.keys()
    worst_weight = max((one[k] - two[k]).abs().max().item() for k in one)
    print(f"largest relative loss difference {worst_loss:.2e}, largest weight difference {worst_weight:.2e}")
    # fp32: the gradient of 4 sequences summed in another order (allreduce of two halves)
    assert worst_loss <= 1e-5
    assert all(torch.allclose(one[k], two[k], rtol=1e-4, atol=1e-6) for k in one)


@pytest.mark.slurm
def test_two_node_tp2_ptq_exports_what_one_node_exports(two_nodes, tiny_hf_models, nemo_run_home, tmp_path):
    from safetensors.torch import load_file

    common = ("ptq_recipe", f"model_path={tiny_hf_models['llama']}", "calibration_tp=2",
              "quantization_config.calibration_dataset_size=4", "quantization_config.calibration_seq_len=32",
              "export_config.dtype=float32")
    began = time.monotonic()
    across = _launch(nemo_run_home, *common, f"export_path={tmp_path / 'across'}", "num_nodes=2", "devices=1",
                     *TWO_NODES)
    print(f"PTQ at TP=2 across 2 nodes: {time.monotonic() - began:.1f} s")
    assert across.returncode == 0, across.stdout[-3000:] + across.stderr[-3000:]
    job = max(_jobs().items(), key=lambda item: int(item[0]))
    _check_ran_on_both_nodes(_task_log(across.stdout, "ptq_recipe"), job[1])

    began = time.monotonic()
    one_node = _launch(nemo_run_home, *common, f"export_path={tmp_path / 'one_node'}", "num_nodes=1",
                       "devices=2", "run.executor=torchrun")
    print(f"PTQ at TP=2 on one node: {time.monotonic() - began:.1f} s")
    assert one_node.returncode == 0, one_node.stdout[-3000:] + one_node.stderr[-3000:]

    files = sorted(p.relative_to(tmp_path / "one_node") for p in (tmp_path / "one_node").rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path / "across") for p in (tmp_path / "across").rglob("*") if p.is_file())
    assert any(name.suffix == ".safetensors" for name in files) and Path("hf_quant_config.json") in files
    for name in files:
        want, have = tmp_path / "one_node" / name, tmp_path / "across" / name
        if name.suffix == ".safetensors":
            a, b = load_file(want), load_file(have)
            assert a.keys() == b.keys()
            assert all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a), name
        elif name.suffix == ".json":
            assert json.loads(want.read_text()) == json.loads(have.read_text()), name
        else:
            assert want.read_bytes() == have.read_bytes(), name


def _rank_process(cluster, node: str, rank: int) -> int:
    """The pid of the worker of global rank `rank` in `node`'s namespace (torchrun's child)."""
    for pid in cluster.network.pids(node):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            parent = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
            parent_command = Path(f"/proc/{parent}/cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if f"RANK={rank}".encode() in environ and b"torchrun" in parent_command:
            return pid
    raise AssertionError(f"no rank-{rank} worker in {node}'s namespace")


@pytest.mark.slurm
@pytest.mark.long
def test_a_killed_node_fails_the_job_and_the_same_command_resumes(two_nodes, data_parallel_distillation, kd_pair,
                                                                  nemo_run_home, tmp_path):
    from nemo_optim.training import newest_checkpoint

    output = tmp_path / "distilled"
    command = _launch_command(*_distill_args(kd_pair, output, "num_nodes=2", "devices=1",
                                             "training.checkpoint_interval=2"), *TWO_NODES)
    launched = time.monotonic()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               stdin=subprocess.DEVNULL, env=_launch_env(nemo_run_home))
    try:
        run_dir = tmp_path / "distilled_run"
        while newest_checkpoint(run_dir) is None:  # the first checkpoint (step 2 of 20)
            assert process.poll() is None, process.communicate()
            assert time.monotonic() - launched < 300, "no checkpoint after 300 s"
            time.sleep(0.1)
        victim = _rank_process(two_nodes, "node2", rank=1)
        os.kill(victim, signal.SIGKILL)
        killed = time.monotonic()
        stdout, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    time_to_exit = time.monotonic() - killed
    state = max(_jobs().items(), key=lambda item: int(item[0]))[1]
    print(f"killed rank 1 (pid {victim}, node2) {killed - launched:.1f} s after the launch; launch.py exited "
          f"{time_to_exit:.1f} s later with {process.returncode}; job {state}")
    assert process.returncode == 1, stdout[-3000:] + stderr[-3000:]
    assert state == ("FAILED", "node[1-2]")  # not requeued, not left running
    # srun's --kill-on-bad-exit ends node1's agent as soon as node2's exits; launch.py polls every 5 s
    assert time_to_exit < 60
    assert "distillation_recipe: FAILED (logs: " in stdout
    assert not output.exists()
    last_checkpoint = newest_checkpoint(run_dir)
    step = int(last_checkpoint.name.removeprefix("step_"))
    assert 2 <= step < STEPS

    # the same command again: resumes from that checkpoint, ends where the uninterrupted run ended
    began = time.monotonic()
    resumed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                             env=_launch_env(nemo_run_home), timeout=900)
    print(f"resumed run: {time.monotonic() - began:.1f} s")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    log = _task_log(resumed.stdout, "distillation_recipe")
    assert f"resumed from {last_checkpoint} (step {step})" in log
    uninterrupted, _ = data_parallel_distillation
    expected, got = _history(uninterrupted), _history(output)
    assert [(r["kind"], r["step"]) for r in got] == [(r["kind"], r["step"]) for r in expected]
    assert all(have["loss"] == pytest.approx(want["loss"], rel=1e-6) for want, have in zip(expected, got))
    clean, again = _weights(uninterrupted), _weights(output)
    print(f"largest weight difference to the uninterrupted run: "
          f"{max((clean[k] - again[k]).abs().max().item() for k in clean):.2e}")
    assert all(torch.allclose(clean[k], again[k], rtol=1e-6, atol=1e-8) for k in clean)

    # the launch's last line is the failing node's error (rank 1 on node2, SIGKILL), not the
    # SIGTERM of node1's agent that srun stopped because of it
    last = stderr.strip().splitlines()[-1]
    assert last == "error: distillation_recipe failed: rank 1 on node2: killed by signal 9 (SIGKILL)", last
