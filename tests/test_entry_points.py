"""`nemo llm STAGE --factory RECIPE ...` and `launch.py RECIPE ...` refuse the same mistakes with
the same line: one `error: RECIPE: message` line on stderr, exit code 2, nothing submitted and no
experiment directory written. Each case runs both commands as a new user would (subprocesses of
the real `nemo` console script and launch.py), all cases at once: they stop before any launch."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from kube import write_kubeconfig

REPO = Path(__file__).resolve().parents[1]

# case -> (stage, recipe, arguments); the first two, a Kubeflow setting the TrainJob check
# refuses, and an output that exists
CASES = {
    "bad_key": ("distill", "distillation_recipe", ["training.nonexistent=3"]),
    "bad_value": ("speculative", "speculative_recipe", ["speculative_config.num_draft_tokens=-1"]),
    "kubeflow_setting": ("ptq", "ptq_recipe", ["run.executor=kubeflow", "run.executor.num_nodes=-1"]),
    "existing_output": ("ptq", "ptq_recipe", ["export_config.path={tmp}/exists"]),
}


def _run(command: list[str], cwd: Path, home: Path, kubeconfig: Path) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if not key.startswith("NEMO_OPTIM_K8S_")}
    env.update(KUBECONFIG=str(kubeconfig), NEMORUN_HOME=str(home))
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL, env=env,
                          timeout=600)


@pytest.fixture(scope="module")
def refusals(tmp_path_factory):
    """case -> (nemo llm's result, launch.py's result, the case's scratch directory). No --dryrun:
    a check that let the mistake through would launch (and fail these tests)."""
    root = tmp_path_factory.mktemp("entry_points")
    kubeconfig = root / "kubeconfig"
    write_kubeconfig(kubeconfig)
    nemo = str(Path(sys.executable).parent / "nemo")
    jobs = {}
    for case, (stage, recipe, arguments) in CASES.items():
        scratch = root / case
        (scratch / "exists").mkdir(parents=True)
        arguments = [item.format(tmp=scratch) for item in arguments]
        jobs[(case, "nemo")] = ([nemo, "llm", stage, "--factory", recipe, *arguments, "--yes"], scratch,
                                scratch / "home_nemo")
        jobs[(case, "launch")] = ([sys.executable, str(REPO / "launch.py"), recipe, *arguments, "--yes"], scratch,
                                  scratch / "home_launch")
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {key: pool.submit(_run, command, cwd, home, kubeconfig) for key, (command, cwd, home) in jobs.items()}
        results = {key: future.result() for key, future in futures.items()}
    return {case: (results[(case, "nemo")], results[(case, "launch")], root / case) for case in CASES}


EXPECTED = {
    "bad_key": "error: distillation_recipe: training has no field 'nonexistent'; its fields: adam_beta1, adam_beta2, ",
    "bad_value": "error: speculative_recipe: SpeculativeConfig: num_draft_tokens=-1 must be a positive integer.",
    "kubeflow_setting": "error: ptq_recipe: TrainJob spec.trainer.numNodes (from run.executor.num_nodes): -1 must be "
                        "at least 1",
    "existing_output": "error: ptq_recipe: export_path='{tmp}/exists' exists; pass overwrite=True to replace "
                       "it, or choose another path.",
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_both_entries_refuse_a_mistake_with_the_same_line(refusals, case):
    nemo, launch, scratch = refusals[case]
    for result in (nemo, launch):
        lines = result.stderr.strip().splitlines()
        assert (result.returncode, len(lines)) == (2, 1), result.args[:4] + [result.stdout[-2000:], result.stderr]
        assert lines[0].startswith(EXPECTED[case].format(tmp=scratch)), lines[0]
        assert "Traceback" not in result.stdout and "Unexpected error" not in result.stdout
    assert nemo.stderr == launch.stderr
    # nothing submitted or written: no NeMo-Run experiment, no outputs in the working directory
    assert sorted(path.name for path in scratch.iterdir()) == ["exists"]
    assert not any((scratch / "exists").iterdir())
