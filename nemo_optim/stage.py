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
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import torch

from nemo_optim import cpu, runtime
from nemo_optim.errors import InputError, one_line_input_errors, refuse_existing_outputs

__all__ = ["StageArgumentError", "refuse_existing_outputs", "save_stage_model", "stage_entry", "stage_runtime"]


class StageArgumentError(InputError):
    """A stage argument that cannot work with how the job was launched."""


def stage_entry(check_arguments: Callable[..., None], resumable_outputs: Callable[..., set[str]] | None = None):
    """Decorates a stage entry: input errors become one line and exit 2 in a NeMo-Run task, and
    `stage.check_arguments` is what launchers run before submitting it. `resumable_outputs(**arguments)`
    names the existing outputs a rerun goes on from (so launchers do not refuse them)."""

    def decorate(stage):
        wrapped = one_line_input_errors(stage)
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
