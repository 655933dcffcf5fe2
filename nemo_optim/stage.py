"""What every stage entry shares, so each one reads the same way.

A stage entry (`nemo_optim/stages/<stage>.py`) is one typed function with NeMo 2's argument
names where NeMo 2 had the stage:

    @stage_entry(check_arguments)          # one-line input errors; launchers call check_arguments
    def prune(*, nemo_checkpoint, save_path, ..., overwrite=False) -> Path:
        check_arguments(...)                # 1. everything checkable before a model is loaded
        refuse_existing_outputs(...)        # 2. no output is silently replaced
        with stage_runtime(tp_size, pp_size, devices, num_nodes):   # 3. processes and parallelism
            loaded = load_model(...)        # 4. load
            ...                             # 5. the stage's own work (library functions)
            save_stage_model(...)           # 6. native checkpoint, then the optional HF export

`check_arguments(*, launch_target=None, **arguments)` loads no model and reads local files only
where `launch_target` says the job runs on this machine (nemo_optim.prelaunch).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import torch

from nemo_optim import cpu, runtime
from nemo_optim.errors import InputError, one_line_input_errors, refuse_existing_outputs

__all__ = ["StageArgumentError", "refuse_existing_outputs", "save_stage_model", "stage_entry", "stage_runtime"]


class StageArgumentError(InputError):
    """A stage argument that cannot work with how the job was launched."""


# One name per concept: the model a stage reads is `model_path` (a second one `<role>_model_path`),
# what it writes `output_path` (a second artifact `export_path` / `hf_export_path`). The names NeMo 2's
# stages used (and this project's before) stay accepted where the stage lists them: alias -> current.
ALIASES = {"nemo_checkpoint": "model_path", "student_model_path": "model_path", "source": "model_path",
           "path": "model_path", "save_path": "output_path", "export_config.path": "export_path"}
OUTPUT_FIELDS = ("output_path", "export_path", "hf_export_path")


def output_fields(stage: Callable) -> list[str]:
    """The outputs a stage writes, from its signature (a rerun refuses them unless overwrite=True)."""
    return [name for name in inspect.signature(stage).parameters if name in OUTPUT_FIELDS]


def with_current_names(stage: Callable, arguments: dict[str, Any], announce: bool = True) -> dict[str, Any]:
    """`arguments` with every alias the stage accepts replaced by the current name (one line says so)."""
    parameters = inspect.signature(stage).parameters
    arguments = dict(arguments)
    for alias, current in ALIASES.items():
        holder, _, field = alias.rpartition(".")
        if current not in parameters or (holder or alias) not in parameters:
            continue
        value = getattr(arguments.get(holder), field, None) if holder else arguments.pop(alias, None)
        if value is None:
            continue
        # the alias wins: recipes set the current names, so an alias was given on purpose
        replaced = arguments.get(current)
        replaced = f" (instead of {replaced!r})" if replaced not in (None, value) else ""
        if holder:  # a field of a config argument: cleared there, so it is read in one place
            arguments[holder] = dataclasses.replace(arguments[holder], **{field: None})
        arguments[current] = value
        if announce:
            print(f"note: {alias} is NeMo 2's name for {current}, which is current: {current}={value!r}{replaced}",
                  file=sys.stderr)
    return arguments


def stage_entry(check_arguments: Callable[..., None], resumable_outputs: Callable[..., set[str]] | None = None):
    """Decorates a stage entry: NeMo 2's argument names are taken as the current ones (`ALIASES`),
    input errors become one line and exit 2 in a NeMo-Run task, and `stage.check_arguments` is what
    launchers run before submitting it. `resumable_outputs(**arguments)` names the existing outputs
    a rerun goes on from (so launchers do not refuse them)."""

    def decorate(stage):
        @functools.wraps(stage)
        def entry(**arguments):
            return stage(**with_current_names(stage, arguments))

        wrapped = one_line_input_errors(entry)
        wrapped.check_arguments = check_arguments
        wrapped.resumable_outputs = resumable_outputs or (lambda **_: set())
        return wrapped

    return decorate


def _positive(field: str, value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise StageArgumentError(f"{field}={value!r} must be a positive integer.")
    return value


@contextlib.contextmanager
def stage_runtime(tp_size: int = 1, pp_size: int = 1, devices: Optional[int] = None, num_nodes: Optional[int] = None,
                  *, seed: int = 1234, tp_field: str = "tp_size", pp_field: str = "pp_size") -> Iterator[None]:
    """torch.distributed + megatron's parallel state for the stage, and on CPU the stage's
    adaptations (`nemo_optim.cpu.adapted`), torn down after.

    `devices` x `num_nodes` (NeMo 2's names) must be the processes actually launched; None skips
    that check. Errors name the stage's own fields (`tp_field`, e.g. ptq's `calibration_tp`)."""
    parallel = runtime.ParallelConfig(tensor_model_parallel_size=_positive(tp_field, tp_size),
                                      pipeline_model_parallel_size=_positive(pp_field, pp_size), seed=seed)
    for field, value in (("devices", devices), ("num_nodes", num_nodes)):
        if value is not None:
            _positive(field, value)
    with runtime.parallel_runtime(parallel), cpu.adapted(), runtime.imported_objects_frozen():
        if devices is not None or num_nodes is not None:
            mismatch = runtime.launched_processes_message(devices or 1, num_nodes or 1)
            if mismatch:
                raise StageArgumentError(mismatch)
        yield


def save_stage_model(model: torch.nn.Module, config, save_path: str | Path, hf_dir: Path,
                     hf_export_path: Optional[str], producer: dict) -> None:
    """The stage's model as a native checkpoint at `save_path` (atomic), then, when asked, as an
    HF directory at `hf_export_path` in the model's dtype."""
    from nemo_optim import checkpoint
    from nemo_optim.models.hf import export_hf

    checkpoint.save_checkpoint(model, config, save_path, hf_dir, producer=producer)
    runtime.print0(f"{producer['stage']} native checkpoint: {save_path}")
    if hf_export_path:
        try:
            export_hf(model, hf_dir, hf_export_path, dtype=config.torch_dtype)
        except BaseException:
            # the stage failed: none of its outputs stays, so the rerun is not refused
            shutil.rmtree(save_path, ignore_errors=True)
            raise
        runtime.print0(f"HF export: {hf_export_path}")
