"""Process and parallel set-up: torch.distributed, megatron parallel_state, seeds, ranks, teardown.

Everything else asks `runtime.device()` for the device and never special-cases CPU. What running
on a CPU needs lives in `nemo_optim.cpu`: its device shims are installed here (megatron's parallel
code needs them from the start), its allocator settings by the stage skeleton
(`nemo_optim.cpu.adapted`).

Steps of `parallel_runtime(ParallelConfig(...))`:
  1. init torch.distributed (gloo on CPU, nccl on GPU; env:// under torchrun, an in-memory
     store for a single process),
  2. on CPU, install the shims megatron-core needs (`nemo_optim.cpu.devices.install`),
  3. init megatron `parallel_state` with the TP/PP sizes (DP is what is left),
  4. seed torch and megatron's RNG tracker,
  5. on exit, destroy parallel_state and the process group.

On a CPU with 2 processes (TP=2, PP=2): the tests marked `distributed` start torchrun themselves,
    .venv/bin/python -m pytest -m distributed tests/test_checkpoint.py tests/test_nemo2.py
"""

# No `from __future__ import annotations`: NeMo-Run's CLI parser reads these config
# dataclasses' annotations as real types (and needs Optional[...] rather than `X | None`).

import contextlib
import dataclasses
import os
import random
from collections.abc import Iterator
from typing import Optional, Literal

import numpy as np
import torch
import torch.distributed as dist

from nemo_optim.cpu import devices as cpu_devices
from nemo_optim.errors import InputError

Backend = Literal["auto", "gloo", "nccl"]


@dataclasses.dataclass
class ParallelConfig:
    """How the model is split across processes."""

    tensor_model_parallel_size: int = 1
    """Tensor parallel size (TP): splits every linear layer across TP processes."""
    pipeline_model_parallel_size: int = 1
    """Pipeline parallel size (PP): splits the layer stack across PP processes."""
    backend: Backend = "auto"
    """torch.distributed backend; `auto` picks nccl when CUDA is available, else gloo."""
    seed: int = 1234
    """Seed for torch, numpy, random and megatron's RNG tracker."""

    def __post_init__(self) -> None:
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise InputError(f"{name}={value!r} must be a positive integer (1 = no split).")
        if self.backend not in ("auto", "gloo", "nccl"):
            raise InputError(f"backend={self.backend!r}: choose one of auto, gloo, nccl.")

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size


def use_cuda() -> bool:
    return torch.cuda.is_available()


def device() -> torch.device:
    """The device this process computes on."""
    if use_cuda():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main_process() -> bool:
    return rank() == 0


def launched_processes_message(devices: int, num_nodes: int) -> Optional[str]:
    """Why `devices` x `num_nodes` (a stage's NeMo 2-style arguments) disagrees with the
    processes actually launched, or None when they agree."""
    if world_size() == devices * num_nodes:
        return None
    return (f"devices x num_nodes = {devices * num_nodes} but {world_size()} processes were launched; "
            f"launch with torchrun --nproc_per_node {devices} (or set devices to match).")


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(value, src: int = 0):
    """`value` of process `src`, on every process (a picklable Python object)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def print0(*args, **kwargs) -> None:
    if is_main_process():
        print(*args, **kwargs, flush=True)


# --- process -----------------------------------------------------------------------------------

@contextlib.contextmanager
def imported_objects_frozen() -> Iterator[None]:
    """Inside, the objects that exist on entering (the imported libraries: ~600k for torch,
    megatron-core, ModelOpt and transformers) are left out of Python's full garbage collections
    (`gc.freeze`): they live as long as the process, and each full collection walked all of them,
    0.35 s at a time in the middle of SmolLM2's ptq stage. Objects created inside are collected as
    usual; on leaving, the frozen ones are collected as usual again (unless the caller had frozen
    objects itself)."""
    import gc

    frozen_by_caller = gc.get_freeze_count() > 0
    gc.freeze()
    try:
        yield
    finally:
        if not frozen_by_caller:
            gc.unfreeze()


# --- set-up and teardown ---------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    from megatron.core import tensor_parallel

    if use_cuda():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)


def _init_process_group(backend: Backend) -> None:
    if dist.is_initialized():
        return
    if backend == "auto":
        backend = "nccl" if use_cuda() else "gloo"
    if use_cuda():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend=backend, init_method="env://")
    else:
        # A single process needs no rendezvous: an in-memory store avoids opening a port.
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)


def initialize(config: ParallelConfig) -> None:
    """Sets up distributed state for `config`. Prefer the `parallel_runtime` context manager."""

    _init_process_group(config.backend)
    if world_size() % config.model_parallel_size != 0:
        raise InputError(
            f"world size {world_size()} is not divisible by tensor_model_parallel_size x "
            f"pipeline_model_parallel_size = {config.model_parallel_size}; launch "
            f"{config.model_parallel_size} x N processes (torchrun --nproc_per_node ...)."
        )
    if not use_cuda():
        cpu_devices.install()
    set_model_parallel_sizes(config)


def set_model_parallel_sizes(config: ParallelConfig) -> None:
    """(Re)builds megatron's TP/PP groups in the existing process group, e.g. to go from
    TP=2 calibration to a TP=1 export in the same job; data parallel takes the rest."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=config.tensor_model_parallel_size,
        pipeline_model_parallel_size=config.pipeline_model_parallel_size,
    )
    seed_everything(config.seed)


def data_parallel_rank() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_rank() if parallel_state.model_parallel_is_initialized() else 0


def shutdown() -> None:
    """Destroys megatron parallel state and a one-process group. A launched job's process group
    (torchrun's rendezvous) lives as long as the process: ranks that built it again for a second
    stage in the same process could pair up stale store keys and wait on each other forever."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    cpu_devices.remove()
    if dist.is_initialized() and dist.get_world_size() == 1:
        dist.destroy_process_group()


@contextlib.contextmanager
def parallel_runtime(config: Optional[ParallelConfig] = None) -> Iterator[ParallelConfig]:
    """`with parallel_runtime(ParallelConfig(tensor_model_parallel_size=2)):` ... torn down after."""
    config = config or ParallelConfig()
    initialize(config)
    try:
        yield config
    finally:
        shutdown()
