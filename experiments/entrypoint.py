"""What every experiment script shares. Each is a NeMo-Run experiment entrypoint, so it takes
NeMo-Run's command line like `nemo llm` and launch.py do (`executor=slurm executor.partition=X`,
`name=value` for its settings, `--dryrun`, `--yes`), and runs its tasks through `run_experiment`,
which adds what NeMo-Run lacks: the tasks' real final states and a non-zero exit on failure."""

from pathlib import Path
from typing import Optional

import nemo_run as run

from nemo_optim_recipes.executors import local
from nemo_optim_recipes.launching import run_experiment


def run_tasks(ctx: run.cli.RunContext, name: str, tasks: dict[str, run.Partial], report: Optional[str] = None) -> None:
    """Runs `tasks` in order on the command line's executor (this machine when none is given);
    exits non-zero when a task failed, else prints where the report is."""
    code = run_experiment(name, tasks, ctx.executor if ctx.executor is not None else local(), dryrun=ctx.dryrun)
    if code:
        raise SystemExit(code)
    if report is not None and not ctx.dryrun:
        print(f"report: {Path(report).resolve()}")
