"""Errors a user can fix (a setting, a file, a path), and how a stage reports them.

Every such error is an `InputError` whose message names the field or file, the value and what to
do. A stage entry wrapped in `one_line_input_errors` lets them propagate when called from Python
(tests, notebooks), and when it runs as a NeMo-Run task prints `error: <message>` as one line and
exits 2. Anything else keeps its traceback: it is a bug or an environment failure, and the
traceback is what finds it.

A task also leaves a structured record of how it failed, for the launcher (which reads the job's
state from NeMo-Run and then these records, never its logs): when `NEMO_OPTIM_ERROR_DIR` is set
(recipes/launching.py sets it to a directory in the job's own directory, on a filesystem the
launcher sees: this machine or a Slurm cluster's shared one), a rank whose stage raises writes
`rank-<R>.json` there, {"rank", "host", "type", "message", "input_error", "signal", "time"}. A
process killed by a signal cannot write: a small watcher process started with the stage waits on
it (pidfd), reads its exit status while it is a zombie (/proc/<pid>/stat, before torchrun reaps
it) and writes the record with the signal instead.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
import time
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


ERROR_DIR_ENV = "NEMO_OPTIM_ERROR_DIR"
_WATCHED = "_NEMO_OPTIM_ERROR_WATCHED"  # set once a process has its watcher (stages may nest)


def error_record_path(directory: str | Path, rank: int) -> Path:
    return Path(directory) / f"rank-{rank}.json"


def _rank() -> int:
    return int(os.environ.get("RANK") or 0)


def write_error_record(directory: str | Path, record: dict) -> None:
    """Writes `rank-<R>.json` unless the rank already left one (an inner stage, or the watcher):
    the first failure of a rank is its cause."""
    path = error_record_path(directory, record["rank"])
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(json.dumps(record) + "\n")
    try:
        os.link(partial, path)  # atomic, and refuses to replace a record already there
    except FileExistsError:
        pass
    finally:
        partial.unlink(missing_ok=True)


def exception_record(error: BaseException) -> dict:
    message = str(error).strip() or repr(error)
    return {"rank": _rank(), "host": socket.gethostname(), "type": type(error).__name__, "message": message,
            "input_error": isinstance(error, InputError), "signal": None, "time": time.time()}


# the watcher, run as `python -I -S -c _WATCHER PID DIRECTORY RANK HOST`: waits for PID to exit and,
# when a signal ended it and it left no record, writes one with that signal
_WATCHER = r"""
import json, os, select, signal, sys, time
pid, directory, rank, host = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
try:
    descriptor = os.pidfd_open(pid)
except OSError:
    sys.exit(0)
os.write(1, b"ready\n")
os.close(1)
select.select([descriptor], [], [])
try:  # field 52: the exit status as waitpid(2) gives it, readable until the parent reaps the zombie
    status = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[49])
except (OSError, ValueError, IndexError):
    sys.exit(0)
number = status & 0x7F
path = os.path.join(directory, f"rank-{rank}.json")
if not number or number == 0x7F or os.path.exists(path):
    sys.exit(0)
try:
    name = signal.Signals(number).name
except ValueError:
    name = f"signal {number}"
record = {"rank": rank, "host": host, "type": name, "message": f"killed by signal {number} ({name})",
          "input_error": False, "signal": number, "time": time.time()}
os.makedirs(directory, exist_ok=True)
partial = f"{path}.{os.getpid()}"
with open(partial, "w") as stream:
    stream.write(json.dumps(record) + "\n")
try:
    os.link(partial, path)
except FileExistsError:
    pass
os.unlink(partial)
"""


def _start_watcher(directory: str) -> None:
    """A process that outlives this one by a moment and records a death by a signal. Started
    once per process; without pidfd (Linux < 5.3) there is none, and such a death leaves no record."""
    if os.environ.get(_WATCHED) == str(os.getpid()) or not hasattr(os, "pidfd_open"):
        return
    os.environ[_WATCHED] = str(os.getpid())
    try:
        watcher = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _WATCHER, str(os.getpid()), directory, str(_rank()),
             socket.gethostname()],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
        watcher.stdout.readline()  # waiting on this process before the stage starts
        watcher.stdout.close()
    except OSError:
        pass


def one_line_input_errors(stage):
    """Stage entry decorator: in a NeMo-Run task, an InputError becomes `error: <message>` on
    stderr and exit code 2 (no traceback), and any failure leaves its record in
    `$NEMO_OPTIM_ERROR_DIR`; elsewhere errors propagate unchanged."""

    @functools.wraps(stage)
    def run(*args, **kwargs):
        task = running_as_task()
        directory = os.environ.get(ERROR_DIR_ENV) if task else None
        if directory:
            _start_watcher(directory)
        try:
            return stage(*args, **kwargs)
        except BaseException as error:
            if isinstance(error, SystemExit) and not error.code:
                raise
            if directory and not isinstance(error, KeyboardInterrupt):
                try:
                    write_error_record(directory, exception_record(error))
                except OSError:
                    pass  # the record is an aid: the task's own failure is what the job reports
            if not task or not isinstance(error, InputError):
                raise
            print(f"error: {error}", file=sys.stderr, flush=True)
            raise SystemExit(INPUT_ERROR_EXIT_CODE) from None

    return run

