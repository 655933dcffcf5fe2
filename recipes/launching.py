"""What `launch.py` and `nemo llm` do: pick a recipe and an executor, apply overrides, check them
before anything is submitted, run, and report the task's real final state.

Both entries run the same pre-launch function (`prepare_launch`: overrides, executor, then
`check_launch`: `validate` and the Kubeflow TrainJob check) and print any input error as one line,
`error: RECIPE: message`, exit code 2, with nothing submitted or written. `nemo llm` gets there
through NeMo-Run's own extension point, a RunContext subclass (`CheckedRunContext`).

A task that fails is reported from NeMo-Run's job state and the records the stage wrapper
(`nemo_optim.errors.one_line_input_errors`) leaves in the job's `errors/` directory, never from
its logs: `error: RECIPE failed: rank R on HOST: Type: message`, exit code 1.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import fiddle as fdl
import nemo_run as run

from nemo_optim.errors import ERROR_DIR_ENV, InputError
from nemo_optim.stage import output_fields, with_current_names

if TYPE_CHECKING:
    from nemo_optim.prelaunch import LaunchTarget

TERMINAL_FAILURES = {"FAILED", "CANCELLED", "UNKNOWN"}
TERMINAL_STATES = TERMINAL_FAILURES | {"SUCCEEDED"}


def all_recipes() -> dict:
    from nemo_optim_recipes import llm

    return llm.RECIPES


def all_executors() -> dict:
    from nemo_optim_recipes import executors

    return executors.EXECUTORS


def split_executor(arguments: list[str]) -> tuple[str | None, list[str]]:
    """NeMo-Run's CLI syntax, as `nemo llm` and the experiments take it: `run.executor=NAME` and
    `run.executor.FIELD=VALUE`. Returns (NAME of the last `run.executor=`, or None; the other
    arguments, executor fields as `executor.FIELD=VALUE`). The bare `executor=` form of earlier
    versions of this launcher is still read."""
    arguments = [item.removeprefix("run.") if item.startswith(("run.executor=", "run.executor.")) else item
                 for item in arguments]
    names = [item.partition("=")[2] for item in arguments if item.startswith("executor=")]
    return (names[-1] if names else None), [item for item in arguments if not item.startswith("executor=")]


def fail(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


class OverrideError(ValueError):
    """One `key=value` override that does not fit the recipe."""


class LaunchRefused(Exception):
    """A pre-launch check failed; the message is the one line printed after `error: `."""


INPUT_ERROR_EXIT_CODE = 2


def _fields(config) -> list[str]:
    """The argument names a Config/Partial accepts (its target's signature)."""
    import inspect

    target = config.__fn_or_cls__
    return sorted(inspect.signature(target).parameters)


def _check_key(partial: run.Partial, key: str):
    """Raises OverrideError unless `key` names a field; returns that field's annotation."""
    import inspect

    node, walked, annotation = partial, [], None
    parts = key.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, fdl.Buildable):
            raise OverrideError(f"{'.'.join(walked)} is a plain value, it has no field {part!r}")
        if part not in _fields(node):
            where = ".".join(walked) or "the recipe"
            raise OverrideError(f"{where} has no field {part!r}; its fields: {', '.join(_fields(node))}")
        annotation = inspect.signature(node.__fn_or_cls__).parameters[part].annotation
        if depth < len(parts) - 1:
            # only the path is read: fiddle cannot read the default of a default_factory field
            # (a list), which the last part may be
            child = getattr(node, part, None)
            if child is None and _optional_dataclass(annotation) is not None:
                # `evaluation.lm_eval.tasks=[...]` where `evaluation.lm_eval` is None: the
                # user asks for that section, so it starts from its defaults
                child = run.Config(_optional_dataclass(annotation))
                setattr(node, part, child)
            node = child
        walked.append(part)
    return annotation


def _optional_dataclass(annotation):
    """`C` for an `Optional[C]` annotation where C is a dataclass, else None."""
    import dataclasses
    import typing

    kinds = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    return kinds[0] if len(kinds) == 1 and dataclasses.is_dataclass(kinds[0]) else None


def _expected(annotation) -> str:
    """`one of 'a', 'b'` for a Literal (also inside Optional), else `a value of type T`."""
    import typing

    choices = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if typing.get_origin(annotation) is typing.Union and len(choices) == 1:
        return _expected(choices[0]) + " or None"
    if typing.get_origin(annotation) is typing.Literal:
        return "one of " + ", ".join(repr(choice) for choice in choices)
    if typing.get_origin(annotation) is list or annotation is list:
        return "a list written as a Python literal, strings quoted (e.g. [7, 8] or ['lm_head'])"
    return f"a value of type {getattr(annotation, '__name__', str(annotation))}"


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
            raise OverrideError(f"override {item!r}: expected {_expected(annotation)}, got {value!r}") from None
    return partial


def executor_with_overrides(factory, overrides: list[str]) -> run.Config:
    """`name=value` items: the factory's own arguments (account, pvc, ...) first, then any
    field of the executor it returns (e.g. `retries=2`)."""
    import inspect
    import typing

    parameters = inspect.signature(factory).parameters
    arguments, rest = {}, []
    for item in overrides:
        key, _, value = item.partition("=")
        if key not in parameters:
            rest.append(item)
            continue
        kinds = typing.get_args(parameters[key].annotation) or (parameters[key].annotation,)
        try:
            arguments[key] = int(value) if int in kinds else value
        except ValueError:
            raise OverrideError(f"executor override {item!r}: expected an integer") from None
    config = factory(**arguments)
    try:
        return apply_overrides(config, rest)
    except OverrideError as error:
        raise OverrideError(f"executor {factory.__name__}: {error}; or one of its arguments: "
                            f"{', '.join(parameters)}") from None


# where stages write; a stage refuses an existing one unless overwrite=True
def existing_output_message(stage, arguments: dict, resumable: set[str] = frozenset()) -> str | None:
    """The first output (a field the stage's signature names as one) that a stage with these
    arguments would refuse to replace, as one line (`resumable`: existing outputs it goes on from)."""
    if arguments.get("overwrite"):
        return None
    for field in output_fields(stage):
        path = arguments.get(field)
        if field not in resumable and path and Path(path).exists():
            return f"{field}={str(path)!r} exists; pass overwrite=True to replace it, or choose another path."
    return None


def launch_target(executor) -> LaunchTarget:
    """Where a built executor runs its job: on this machine or not, and with how many GPUs
    (None when the executor does not say)."""
    from nemo_optim.prelaunch import LaunchTarget

    if executor is None or isinstance(executor, run.LocalExecutor):  # None: in this process (--direct)
        import torch

        return LaunchTarget(local=True, gpus=torch.cuda.device_count())
    tunnel = getattr(executor, "tunnel", None)
    local = isinstance(tunnel, run.LocalTunnel)
    if hasattr(executor, "gpus_per_node"):  # Slurm: no gpus_per_node requests none
        return LaunchTarget(local=local, gpus=executor.gpus_per_node or 0)
    return LaunchTarget(local=local)


def validate(partial: run.Partial, target: LaunchTarget | None = None) -> None:
    """Builds every nested config (their __post_init__ checks run), refuses outputs that exist
    (unless overwrite=True) and runs the stage's own `check_arguments` (files it reads, GPUs it
    needs, prune targets, ...), without running the stage: a bad setting fails here, not in a
    scheduler's queue."""
    built = fdl.build(partial)
    keywords = with_current_names(built.func, built.keywords, announce=False)  # NeMo 2's names as current ones
    resumable = getattr(built.func, "resumable_outputs", lambda **_: set())(**keywords)
    existing = existing_output_message(built.func, keywords, resumable)
    if existing:
        raise OverrideError(existing)
    check = getattr(built.func, "check_arguments", None)
    if check is not None:
        check(**keywords, launch_target=target)


def _first_line(error: BaseException | str) -> str:
    # fiddle appends a multi-line "Fiddle context"; NeMo-Run a Partial's repr: the first line is the message
    lines = str(error).strip().splitlines()
    return lines[0].strip() if lines else type(error).__name__


def refusal(recipe: str, executor_name: str, error: Exception) -> LaunchRefused:
    """An error of a pre-launch check as the one line both entries print: the recipe's (its
    settings, files, outputs) with the recipe name, anything an executor's client raised
    (kubeconfig, ...) with the executor's."""
    if isinstance(error, LaunchRefused):
        return error
    if isinstance(error, (OverrideError, ValueError, TypeError, ImportError)):
        return LaunchRefused(f"{recipe}: {_first_line(error)}")
    return LaunchRefused(f"executor {executor_name!r}: {type(error).__name__}: {_first_line(error)}")


def check_launch(recipe: str, partial: run.Partial, executor: run.Executor | None, executor_name: str) -> None:
    """The checks of a parsed task and its built executor (None: this process): `validate` (the
    stage's own settings, existing outputs, `check_arguments`) and, for Kubeflow, the TrainJob
    against the Trainer API. Raises LaunchRefused."""
    try:
        validate(partial, launch_target(executor))
        from nemo_optim_recipes.kubernetes import check_trainjob  # Kubeflow: the TrainJob fits the Trainer API

        check_trainjob(executor, partial, recipe)
    except Exception as error:  # noqa: BLE001 - executors raise their clients' errors (kubeconfig, ...)
        raise refusal(recipe, executor_name, error) from None


@dataclass
class Launch:
    partial: run.Partial
    executor_config: run.Config
    executor: run.Executor


def prepare_launch(recipe: str, partial: run.Partial, overrides: list[str], executor_name: str,
                   check: bool = True) -> Launch:
    """The pre-launch function of launch.py and `nemo llm`: `overrides` (the recipe's `key=value`
    and `executor.FIELD=value`) applied to `partial` and to the executor `executor_name`, the
    recipe built before the executor is looked at, then (`check`) `check_launch`. Raises
    LaunchRefused, whose message is the line to print."""
    executors = all_executors()
    if executor_name not in executors:
        raise LaunchRefused(f"executor {executor_name!r} is unknown; valid executors: {', '.join(sorted(executors))}.")
    executor_overrides = [item[len("executor."):] for item in overrides if item.startswith("executor.")]
    overrides = [item for item in overrides if not item.startswith("executor.")]
    try:
        partial = apply_overrides(partial, overrides)
        fdl.build(partial)  # the recipe's own settings are wrong before the executor is looked at
        executor_config = executor_with_overrides(executors[executor_name], executor_overrides)
        job_executor = fdl.build(executor_config)
    except Exception as error:  # noqa: BLE001 - see refusal
        raise refusal(recipe, executor_name, error) from None
    if check:
        check_launch(recipe, partial, job_executor, executor_name)
    return Launch(partial, executor_config, job_executor)


# --- why a task failed: the records its ranks left (nemo_optim.errors) -------------------------

# what a launcher, torchrun or Slurm sends to stop the other ranks once one has failed
_STOPPING_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def error_records(directory: str | Path) -> list[dict]:
    records = []
    for path in sorted(Path(directory).glob("rank-*.json")):
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return records


def first_failure(records: list[dict]) -> dict | None:
    """The rank whose failure caused the others': a death by a signal nothing in the job sends
    (SIGKILL by the OOM killer or a user, SIGSEGV, ...) first, then an exception, then a rank
    stopped by SIGTERM/SIGINT (what torchrun and srun send the rest); the earliest within each."""
    def order(record: dict):
        number = record.get("signal")
        kind = 1 if not number else 2 if number in _STOPPING_SIGNALS else 0
        return kind, record.get("time", float("inf")), record.get("rank", 0)

    return min(records, key=order, default=None)


def failure_reason(record: dict) -> str:
    """One line for a rank's record: an input error as the stage phrased it (the same on every
    rank), anything else with where it happened."""
    message = _first_line(record.get("message", ""))
    if record.get("input_error"):
        return message
    where = f"rank {record.get('rank', 0)} on {record.get('host', '?')}"
    if record.get("signal"):
        return f"{where}: {message}"
    return f"{where}: {record.get('type', 'Error')}: {message}"


def error_dir(executor: run.Executor) -> Path | None:
    """Where a job's ranks leave their failure records: its job directory, when the launcher
    sees that filesystem (this machine, or a Slurm cluster submitted to from one of its nodes)."""
    if not launch_target(executor).local or not getattr(executor, "job_dir", None):
        return None
    return Path(executor.job_dir) / "errors"


def state_name(state) -> str:
    return getattr(state, "name", str(state))


def wait_for_terminal_states(exp: run.Experiment, poll_seconds: float = 5.0,
                             timeout: float | None = None) -> dict[str, str]:
    """Job id -> final state. `exp.run(detach=False)` may return while a Slurm job is still
    SUBMITTED or RUNNING, so the state is polled from the scheduler until it is terminal."""
    began = time.monotonic()
    while True:
        statuses = exp.status(return_dict=True)  # gathered by threads: in no particular order
        states = {job.id: state_name(statuses[job.id]["status"]) for job in exp.jobs}
        if all(state in TERMINAL_STATES for state in states.values()):
            return states
        if timeout is not None and time.monotonic() - began > timeout:
            return states
        time.sleep(poll_seconds)


def rendered_job(partial: run.Partial, executor: run.Executor, name: str) -> str:
    """What a scheduler would receive, without submitting: the sbatch script for Slurm, the
    TrainJob manifest (YAML) for Kubeflow, the command line otherwise."""
    import yaml
    from nemo_run.run.torchx_backend.packaging import package

    with run.Experiment(f"{name}-dryrun", executor=executor, log_level="ERROR") as exp:
        exp.add(partial, name=name)
        exp.dryrun(log=False, delete_exp_dir=False)
        job = exp.jobs[0]
        # the app NeMo-Run's dry run packaged (Job.prepare's call; the Job keeps it private)
        app = package(job.id, job.task, executor=job.executor, serialize_to_file=True)
        role = app.roles[0]
        macros = job.executor.macro_values()
        if macros:
            role = macros.apply(role)
        command = [role.entrypoint, *role.args]
        if isinstance(job.executor, run.SlurmExecutor):
            scripts = sorted(Path(job.executor.experiment_dir).glob("*_sbatch.sh"))
            return scripts[-1].read_text()
        if type(job.executor).__name__ == "KubeflowExecutor":
            from nemo_run.run.torchx_backend.launcher import launch
            from nemo_run.run.torchx_backend.schedulers.api import get_executor_str

            # the scheduler's own dry run (what Job.launch(dryrun=True) calls): with a work-dir claim
            # the command becomes its launch.sh. A Kubernetes name (RFC 1123); a real launch also
            # appends a unique suffix.
            _, dryrun_info = launch(app, get_executor_str(job.executor), job.executor, dryrun=True)
            base = job.executor.train_job_basename or name
            k8s_name = re.sub(r"[^a-z0-9-]+", "-", base.lower()).strip("-") or "job"
            return yaml.safe_dump(job.executor.get_job_body(k8s_name, dryrun_info.request.cmd), sort_keys=False)
        return " ".join(command)


def use_this_python() -> None:
    """Local tasks run `python -m ...` from PATH: make that the interpreter running the launcher
    (the project's venv), not whatever python comes first on PATH."""
    bin_dir = str(Path(sys.executable).parent)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != bin_dir:
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


def run_experiment(name: str, tasks: dict[str, run.Partial], executor: run.Config, *, dryrun: bool = False,
                   tail_logs: bool = False) -> int:
    """The one wrapper around a NeMo-Run experiment: its tasks in order, each on its own executor
    built from the `executor` config, then what
    NeMo-Run does not give: the real final states (polled until terminal: Slurm may still be
    SUBMITTED when `exp.run` returns), one line per task with its logs, and a process exit code.
    A failed task's own error line (a stage's one-line input error, or the exception it ended
    with) is the last thing printed; 0 when every task SUCCEEDED."""
    use_this_python()
    with run.Experiment(name, log_level="WARN") as exp:
        for task_name, task in tasks.items():
            exp.add(task, executor=fdl.build(executor), name=task_name)
            job_executor = exp.jobs[-1].executor  # NeMo-Run's copy, with its job directory
            if error_dir(job_executor) is not None:
                job_executor.env_vars = {**job_executor.env_vars, ERROR_DIR_ENV: str(error_dir(job_executor))}
        if dryrun:
            exp.dryrun()
            return 0
        exp.run(sequential=True, detach=False, tail_logs=tail_logs)
        states = wait_for_terminal_states(exp)
        log_dirs = {job.id: Path(job.executor.job_dir) for job in exp.jobs}
        error_dirs = {job.id: error_dir(job.executor) for job in exp.jobs}
        for job in exp.jobs:
            print(f"{job.id}: {states[job.id]} (logs: {log_dirs[job.id]})")
    failed = [job_id for job_id, state in states.items() if state != "SUCCEEDED"]
    if not failed:
        return 0
    # the first failure in task order (later ones follow from it), its first failing rank
    cause = first_failure(error_records(error_dirs[failed[0]])) if error_dirs[failed[0]] else None
    if cause:
        return fail(f"{failed[0]} failed: {failure_reason(cause)}", code=1)
    return fail(f"task(s) {', '.join(f'{job_id} {states[job_id]}' for job_id in failed)}; see the logs above.", code=1)


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
    try:
        launch = prepare_launch(recipe, recipes[recipe](), overrides, executor)
    except LaunchRefused as refused:
        return fail(str(refused))
    partial, executor_config, job_executor = launch.partial, launch.executor_config, launch.executor
    if dryrun:
        print(partial)
        if executor in ("local", "torchrun"):
            run.dryrun_fn(partial, executor=job_executor)
        else:
            print(rendered_job(partial, job_executor, recipe))
        return 0
    if not yes and sys.stdin.isatty():
        print(partial)
        if input(f"Run {recipe} on {executor}? [y/N] ").strip().lower() not in ("y", "yes"):
            return fail("not confirmed", code=1)
    return run_experiment(recipe, {recipe: partial}, executor_config, tail_logs=True)


# --- `nemo llm`: NeMo-Run's command line, the same checks and errors as launch.py ---------------

@dataclass(kw_only=True)
class CheckedRunContext(run.cli.RunContext):
    """The run context of `nemo llm STAGE` (registered with `run.cli.entrypoint(run_ctx_cls=...)`).

    NeMo-Run parses the command line as ever (`--factory`, `key=value`, `run.executor=NAME`,
    `run.executor.FIELD=value`, `--dryrun`, `--yes`, ...); executors named as in launch.py are
    built by `executor_with_overrides`, as launch.py builds them. Before anything runs or is
    submitted, `prepare_launch` reads the same arguments as launch.py does (the same messages for
    a bad key, value or executor field) and `check_launch` checks what NeMo-Run parsed. An input
    error is one line on stderr, `error: RECIPE: message`, exit code 2 (NeMo-Run prints
    "Unexpected error: ..." or a Partial's repr and exits 1). A launched task runs through
    `run_experiment`: its real final state, `error: RECIPE failed: ...` and exit code 1 when it fails.
    """

    _recipe_name: str = "task"
    _executor_name: str = "local"

    def _exporting(self) -> bool:
        return any([self.to_yaml, self.to_toml, self.to_json])

    def _base_partial(self, fn) -> run.Partial | None:
        """What the arguments apply to: the recipe named by --factory, or the stage's own
        defaults; None for a factory this package does not list (NeMo-Run resolves it)."""
        if not self.factory:
            return run.Partial(fn)
        recipe = all_recipes().get(self.factory)
        if recipe is None:
            return None
        partial = recipe()
        return partial if partial.__fn_or_cls__ is fn else None

    def cli_execute(self, fn, args, entrypoint_type="task"):
        self._recipe_name = self.factory or fn.__name__
        try:
            if entrypoint_type == "task":
                named, rest = split_executor(list(args))
                self._executor_name = named or "local"
                # the recipe's arguments and the executor's, without NeMo-Run's own (run.name, ...)
                overrides = [item for item in rest if not item.startswith(("run.", "-"))]
                base = None if self._exporting() else self._base_partial(fn)
                if base is not None:
                    prepare_launch(self._recipe_name, base, overrides, self._executor_name, check=False)
            super().cli_execute(fn, args, entrypoint_type)
        except LaunchRefused as refused:
            print(f"error: {refused}", file=sys.stderr, flush=True)
            raise SystemExit(INPUT_ERROR_EXIT_CODE) from None
        except InputError as error:  # --direct: the stage ran in this process
            print(f"error: {self._recipe_name} failed: {_first_line(error)}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None

    def parse_args(self, args, lazy=False):
        try:
            return super().parse_args(args, lazy=lazy)
        except Exception as error:  # noqa: BLE001 - see refusal
            raise refusal(self._recipe_name, self._executor_name, error) from None

    def parse_executor(self, name, *args):
        executors = all_executors()
        if name not in executors:
            raise LaunchRefused(f"executor {name!r} is unknown; valid executors: {', '.join(sorted(executors))}.")
        try:
            return executor_with_overrides(executors[name], list(args))
        except Exception as error:  # noqa: BLE001 - see refusal
            raise refusal(self._recipe_name, name, error) from None

    def parse_fn(self, fn, args, **default_kwargs):
        import logging

        logging.getLogger("nemo_run.cli.cli_parser").setLevel(logging.CRITICAL)  # reported once, below
        try:
            task = super().parse_fn(fn, args, **default_kwargs)
        except Exception as error:  # noqa: BLE001 - NeMo-Run raises several types, with a Partial's repr
            raise refusal(self._recipe_name, self._executor_name, error) from None
        if not self._exporting():
            check_launch(self._recipe_name, task, None if self.direct else self.executor, self._executor_name)
        return task

    def _execute_task(self, fn, task_args):
        if self.dryrun or self.repl or self.detach or self.direct or self.executor is None or self._exporting():
            return super()._execute_task(fn, task_args)
        task = self.parse_fn(fn, task_args)
        run.dryrun_fn(task, executor=self.executor)
        if self._should_continue(self.skip_confirmation):
            code = run_experiment(self.name, {self._recipe_name: task}, self.executor, tail_logs=self.tail_logs)
            if code:
                raise SystemExit(code)
