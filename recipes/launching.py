"""What `launch.py` does: pick a recipe and an executor, apply overrides, run, and report the
task's real final state (non-zero exit and the log path on failure)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import fiddle as fdl
import nemo_run as run

TERMINAL_FAILURES = {"FAILED", "CANCELLED", "UNKNOWN"}
TERMINAL_STATES = TERMINAL_FAILURES | {"SUCCEEDED"}


def all_recipes() -> dict:
    from recipes import llm

    return llm.RECIPES


def all_executors() -> dict:
    from recipes import executors

    return executors.EXECUTORS


def fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


class OverrideError(ValueError):
    """One `key=value` override that does not fit the recipe."""


def _fields(config) -> list[str]:
    """The argument names a Config/Partial accepts (its target's signature)."""
    import inspect

    target = config.__fn_or_cls__
    return sorted(inspect.signature(target).parameters)


def _check_key(partial: run.Partial, key: str):
    """Raises OverrideError unless `key` names a field; returns that field's annotation."""
    import inspect

    node, walked, annotation = partial, [], None
    for part in key.split("."):
        if not isinstance(node, fdl.Buildable):
            raise OverrideError(f"{'.'.join(walked)} is a plain value, it has no field {part!r}")
        if part not in _fields(node):
            where = ".".join(walked) or "the recipe"
            raise OverrideError(f"{where} has no field {part!r}; its fields: {', '.join(_fields(node))}")
        annotation = inspect.signature(node.__fn_or_cls__).parameters[part].annotation
        node, walked = getattr(node, part, None), walked + [part]
    return annotation


def apply_overrides(partial: run.Partial, overrides: list[str]) -> run.Partial:
    """`key=value` / `a.b=value` overrides; values are parsed by NeMo-Run's own CLI parser."""
    import logging

    from nemo_run.cli.cli_parser import parse_cli_args

    logging.getLogger("nemo_run.cli.cli_parser").setLevel(logging.CRITICAL)  # we report it once
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise OverrideError(f"override {item!r} is not key=value")
        annotation = _check_key(partial, key.rstrip("+-*/|"))
        try:
            partial = parse_cli_args(partial, [item])
        except Exception:  # noqa: BLE001 - nemo_run raises several types, all with nested messages
            expected = getattr(annotation, "__name__", str(annotation))
            raise OverrideError(f"override {item!r}: expected a value of type {expected}, got {value!r}") from None
    return partial


def validate(partial: run.Partial) -> None:
    """Builds every nested config (their __post_init__ checks run) and runs the stage's own
    `check_arguments` (files it reads, ...) without running the stage."""
    built = fdl.build(partial)
    check = getattr(built.func, "check_arguments", None)
    if check is not None:
        check(**built.keywords)


def state_name(state) -> str:
    return getattr(state, "name", str(state))


def wait_for_terminal_states(exp: run.Experiment, poll_seconds: float = 5.0, timeout: float | None = None) -> dict[str, str]:
    """Job id -> final state. `exp.run(detach=False)` may return while a Slurm job is still
    SUBMITTED or RUNNING, so the state is polled from the scheduler until it is terminal."""
    began = time.monotonic()
    while True:
        states = {job.id: state_name(job.status(runner=exp._runner)) for job in exp.jobs}
        if all(state in TERMINAL_STATES for state in states.values()):
            return states
        if timeout is not None and time.monotonic() - began > timeout:
            return states
        time.sleep(poll_seconds)


def use_this_python() -> None:
    """Local tasks run `python -m ...` from PATH: make that the interpreter running the launcher
    (the project's venv), not whatever python comes first on PATH."""
    bin_dir = str(Path(sys.executable).parent)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


def launch_recipe(
    recipe: str | None,
    overrides: list[str],
    executor: str = "local",
    dryrun: bool = False,
    yes: bool = False,
    list_only: bool = False,
) -> int:
    recipes, executors = all_recipes(), all_executors()
    if list_only:
        print("recipes:   " + ", ".join(sorted(recipes)))
        print("executors: " + ", ".join(sorted(executors)))
        return 0
    if recipe not in recipes:
        return fail(f"recipe {recipe!r} is unknown; valid recipes: {', '.join(sorted(recipes))}.")
    if executor not in executors:
        return fail(f"executor {executor!r} is unknown; valid executors: {', '.join(sorted(executors))}.")
    partial = recipes[recipe]()
    try:
        partial = apply_overrides(partial, overrides)
        validate(partial)
    except (OverrideError, ValueError, TypeError) as error:
        # fiddle appends a multi-line "Fiddle context"; the first line is the message
        return fail(f"{recipe}: {str(error).strip().splitlines()[0]}")
    job_executor = fdl.build(executors[executor]())
    if dryrun:
        print(partial)
        run.dryrun_fn(partial, executor=job_executor)
        return 0
    if not yes and sys.stdin.isatty():
        print(partial)
        if input(f"Run {recipe} on {executor}? [y/N] ").strip().lower() not in ("y", "yes"):
            return fail("not confirmed", code=1)
    use_this_python()
    with run.Experiment(recipe, executor=job_executor, log_level="WARN") as exp:
        exp.add(partial, name=recipe)
        exp.run(sequential=True, detach=False, tail_logs=True)
        states = wait_for_terminal_states(exp)
        failed = {job_id: state for job_id, state in states.items() if state != "SUCCEEDED"}
        for job in exp.jobs:
            print(f"{job.id}: {states[job.id]} (logs: {Path(job.executor.job_dir)})")
    if failed:
        return fail(f"task(s) {', '.join(f'{k} {v}' for k, v in failed.items())}; see the logs above.", code=1)
    return 0
