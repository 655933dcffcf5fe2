"""Errors a user can fix (a setting, a file, a path), and how a stage reports them.

Every such error is an `InputError` whose message names the field or file, the value and what to
do. A stage entry wrapped in `one_line_input_errors` lets them propagate when called from Python
(tests, notebooks), and when it runs as a NeMo-Run task prints `error: <message>` as one line and
exits 2, so the launcher can show that line instead of a traceback. Anything else keeps its
traceback: it is a bug or an environment failure, and the traceback is what finds it.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Iterable
from pathlib import Path

# the module NeMo-Run runs a task with (local, torchrun, Slurm, Kubernetes alike)
TASK_RUNNER = "nemo_run.core.runners.fdl_runner"
INPUT_ERROR_EXIT_CODE = 2


class InputError(ValueError):
    """A setting or an input the user can fix; the message says which and how."""


class OutputExistsError(InputError, FileExistsError):
    """A stage would replace an existing output without `overwrite=True`."""


def refuse_existing_outputs(outputs: Iterable[tuple[str, str | Path | None]], overwrite: bool) -> None:
    """Raises OutputExistsError for the first (field, path) whose path exists, unless `overwrite`."""
    if overwrite:
        return
    for field, path in outputs:
        if path and Path(path).exists():
            raise OutputExistsError(f"{field}={str(path)!r} exists; pass overwrite=True or choose another path.")


def running_as_task() -> bool:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return getattr(spec, "name", None) == TASK_RUNNER


def one_line_input_errors(stage):
    """Stage entry decorator: in a NeMo-Run task, an InputError becomes `error: <message>` on
    stderr and exit code 2 (no traceback); elsewhere it propagates unchanged."""

    @functools.wraps(stage)
    def run(*args, **kwargs):
        try:
            return stage(*args, **kwargs)
        except InputError as error:
            if not running_as_task():
                raise
            print(f"error: {error}", file=sys.stderr, flush=True)
            raise SystemExit(INPUT_ERROR_EXIT_CODE) from None

    return run
