"""megatron-core without CUDA: `torch.cuda` answers and a torch function mode that put what megatron
and ModelOpt create for "cuda" on the CPU. Installed by the parallel set-up (`runtime.initialize`)
on a machine without CUDA, since megatron's parallel code needs them from its first call; removed
when it shuts down.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Optional

import torch
from torch.overrides import TorchFunctionMode


def _is_cuda_device(value) -> bool:
    if isinstance(value, torch.device):
        return value.type == "cuda"
    return isinstance(value, str) and value.split(":")[0] == "cuda"


_GATHER_INTO_TENSOR = ("all_gather_into_tensor", "all_gather_single")
_SPECIAL_FUNCTIONS: dict = {}  # torch function -> whether _CudaToCpuMode must look at its positional arguments


class _CudaToCpuMode(TorchFunctionMode):
    """Maps `device="cuda"` (and `.cuda()`) in torch calls to the CPU, and lets gloo take the
    collectives megatron/ModelOpt issue as they would with NCCL.

    megatron's pipeline schedules and p2p communication create tensors with
    `device=torch.cuda.current_device()` or `"cuda"`; on a CPU-only machine they must land on
    the CPU for gloo to send them.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # every torch call of the process passes here: the common case (no keyword arguments, a
        # function that never takes a device positionally) returns at once
        special = _SPECIAL_FUNCTIONS.get(func)
        if special is None:
            special = _SPECIAL_FUNCTIONS[func] = (func in (torch.Tensor.cuda, torch.Tensor.pin_memory, torch.Tensor.to,
                                                           torch.Tensor.new_empty)
                                                  or getattr(func, "__name__", "") in _GATHER_INTO_TENSOR)
        if not special and not kwargs:
            return func(*args)
        kwargs = dict(kwargs or {})
        if getattr(func, "__name__", "") in _GATHER_INTO_TENSOR and len(args) >= 2 and args[1].dim() == 0:
            # NCCL gathers 0-dim tensors into a 1-D output; gloo wants matching chunk shapes
            # (ModelOpt's layer dropping relies on the former).
            args = (args[0], args[1].reshape(1), *args[2:])
        if func in (torch.Tensor.cuda, torch.Tensor.pin_memory):
            return args[0]
        device_arg = kwargs.get("device")
        if _is_cuda_device(device_arg) or (isinstance(device_arg, int) and func is not torch.Tensor.to):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to or func is torch.Tensor.new_empty:
            args = tuple("cpu" if _is_cuda_device(a) else a for a in args)
        return func(*args, **kwargs)


class _CpuStream:
    """What `torch.cuda.current_stream()` answers on CPU: work is already in order, nothing to wait for."""

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None):
        return event

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_CPU_STREAM = _CpuStream()
_cpu_mode: Optional[_CudaToCpuMode] = None
_saved_cuda_functions: dict[str, object] = {}


def installed() -> bool:
    return _cpu_mode is not None


def install() -> None:
    """Lets megatron-core run without CUDA (once; a no-op while installed).

    - `torch.cuda.current_device()` resolves to the CPU device (megatron passes it as `device=`),
    - `torch.cuda.synchronize()` is a no-op (dist-checkpointing and the schedules call it),
    - `torch.cuda.current_stream()` / `default_stream()` answer a stream with nothing to wait for
      (megatron >= 0.19's grad sync asks for it in every training step: compat),
    - tensors created with `device="cuda"` land on the CPU (`_CudaToCpuMode`),
    - the RNG tracker is megatron's inference tracker: the training tracker forks CUDA RNG
      states, which do not exist here. Weights are initialised on the CPU from torch's global
      RNG (`use_cpu_initialization`), so TP ranks still agree.
    """
    global _cpu_mode
    if _cpu_mode is not None:
        return
    from megatron.core.tensor_parallel import random as mcore_random

    from nemo_optim import compat

    replacements = {"current_device": lambda: torch.device("cpu"), "synchronize": lambda *a, **k: None}
    replacements.update(dict.fromkeys(compat.CUDA_STREAM_GETTERS, lambda device=None: _CPU_STREAM))
    for name, replacement in replacements.items():
        _saved_cuda_functions[name] = getattr(torch.cuda, name)
        setattr(torch.cuda, name, replacement)
    mcore_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    _cpu_mode = _CudaToCpuMode()
    _cpu_mode.__enter__()


def remove() -> None:
    """Undoes `install` (a no-op when not installed)."""
    global _cpu_mode
    if _cpu_mode is None:
        return
    _cpu_mode.__exit__(None, None, None)
    _cpu_mode = None
    for name, original in _saved_cuda_functions.items():
        setattr(torch.cuda, name, original)
    _saved_cuda_functions.clear()


@contextlib.contextmanager
def cuda_on_cpu() -> Iterator[bool]:
    """`install` inside, unless already installed (then left as it is); a no-op with CUDA. Yields
    whether the shims are active inside."""
    if torch.cuda.is_available():
        yield False
        return
    owner = not installed()
    install()
    try:
        yield True
    finally:
        if owner:
            remove()
