"""Process and parallel set-up: torch.distributed, megatron parallel_state, seeds, teardown.

This is the only module that knows about running megatron-core on a CPU. Everything else asks
`runtime.device()` for the device and never special-cases CPU.

Steps of `parallel_runtime(ParallelConfig(...))`:
  1. init torch.distributed (gloo on CPU, nccl on GPU; env:// under torchrun, an in-memory
     store for a single process),
  2. on CPU, install the adjustments megatron-core needs (see `_install_cpu_adjustments`),
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
import functools
import os
import random
from collections.abc import Callable, Iterator
from typing import Optional, Literal

import numpy as np
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

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


def progress(iterable=None, *, description: str, total: int | None = None, disable: bool = False):
    """A tqdm progress bar with an ETA for a long phase, on the main process only."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=description, dynamic_ncols=True, disable=disable or not is_main_process())


@contextlib.contextmanager
def progress_over_layers(layers: torch.nn.ModuleList, description: str, *, keep_type: bool = False,
                         after_each: Optional[Callable[[torch.nn.Module], None]] = None) -> Iterator[None]:
    """A progress bar for code we do not own that walks `layers` (ModelOpt's exporters show none):
    inside, iterating the list reports each layer, and `after_each(layer)` runs once the walk has
    moved past that layer. Only the list object's class is swapped, and restored on leaving. With
    `keep_type`, for code that checks `type(layers) is nn.ModuleList` and walks
    `layers.children()` (ModelOpt's TensorRT-LLM exporter), the list's `children` method is
    shadowed on the instance instead."""
    plain = type(layers)

    def with_progress():
        for layer in progress(list(plain.children(layers)), description=description):
            yield layer
            if after_each is not None:
                after_each(layer)

    if keep_type:
        layers.children = with_progress
        try:
            yield
        finally:
            del layers.children
        return

    class LayersWithProgress(plain):
        def __iter__(self):
            return with_progress()

    layers.__class__ = LayersWithProgress
    try:
        yield
    finally:
        layers.__class__ = plain


# --- CPU adjustments -------------------------------------------------------------------------

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


def _install_cpu_adjustments() -> None:
    """Lets megatron-core run without CUDA.

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


def _remove_cpu_adjustments() -> None:
    global _cpu_mode
    if _cpu_mode is None:
        return
    _cpu_mode.__exit__(None, None, None)
    _cpu_mode = None
    for name, original in _saved_cuda_functions.items():
        setattr(torch.cuda, name, original)
    _saved_cuda_functions.clear()


# glibc's mallopt parameters (malloc.h) and the values its dynamic thresholds settle at
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_GLIBC_MMAP_THRESHOLD_MAX = 32 * 2**20
_GLIBC_MMAP_MAX_DEFAULT = 65536
_NEVER_TRIM = 2**31 - 1  # (mallopt takes an int)


@functools.lru_cache(maxsize=1)
def _libc():  # cached: find_library runs ldconfig, and release_free_heap is called every batch
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _mallopt(parameter: int, value: int) -> bool:
    libc = _libc()
    return bool(libc is not None and hasattr(libc, "mallopt") and libc.mallopt(parameter, value))


# glibc's per-thread cache of small free chunks, off: see cpu_allocator_env
_TCACHE_OFF = "glibc.malloc.tcache_count=0"


def cpu_allocator_env(environ: Optional[dict] = None) -> dict[str, str]:
    """The environment a CPU job's processes should start with (glibc reads it only at start; the
    executors set it). torch allocates every tensor with `posix_memalign`, which asks glibc for the
    size plus 96 bytes and hands back the slack as small free chunks. When those land in glibc's
    per-thread cache (tcache) they are never merged with their neighbours, so a freed activation's
    hole stays exactly its size and the next same-size request, 96 bytes larger, goes above it: in
    about half of the runs SmolLM2's FP8 calibration grew glibc's heap by one activation per layer
    (0.63 -> 0.87-0.99 GiB over baseline, in-use memory the same), and the freed space then held
    the checkpoint writer's copies resident. With the cache off: 0.60-0.64 in 10 of 10 runs, same
    time; a KD step 3.2 instead of 3.8 GiB peak and no slower. A user's own GLIBC_TUNABLES
    setting of the cache is kept."""
    tunables = (os.environ if environ is None else environ).get("GLIBC_TUNABLES", "")
    if "glibc.malloc.tcache_count" in tunables:
        return {"GLIBC_TUNABLES": tunables}
    return {"GLIBC_TUNABLES": ":".join(part for part in (tunables, _TCACHE_OFF) if part)}


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


_freed_buffers_depth = 0


@contextlib.contextmanager
def freed_buffers_returned_to_os(threshold_bytes: int = 2**20) -> Iterator[bool]:
    """Inside: every CPU buffer of `threshold_bytes` or more is its own mapping, returned to the OS
    when freed. For one-shot work whose temporaries would otherwise stay in glibc's heap: loading
    a model (a full-size initialization copy per weight, the importer's reads: SmolLM2 is resident
    at 1.09 GiB after loading instead of 1.21), saving a checkpoint (megatron's writer clones the
    SwiGLU halves) and exporting (the exporter's state dict): the whole ptq stage peaked at 1.51-1.57x
    the 481 M model's fp32 weights instead of 1.83x.

    Not for loops that free and allocate the same large buffers again: each allocation then pays
    fresh pages (SmolLM2's FP8 calibration took 1.6x as long, GPTQ-lite's weight update ~4x, a KD
    step 1.2-1.35x); they use the heap and `release_free_heap`. On leaving, the thresholds are
    set to where glibc's own settle (32 MiB, trim at 64) and the heap's free pages are given back.
    A no-op on GPU (activations are device memory) and when the user set MALLOC_MMAP_THRESHOLD_.
    Yields whether it applied."""
    global _freed_buffers_depth
    if _freed_buffers_depth:  # nested (a save inside a load, ...): the outermost one decides
        _freed_buffers_depth += 1
        try:
            yield True
        finally:
            _freed_buffers_depth -= 1
        return
    applied = not use_cuda() and "MALLOC_MMAP_THRESHOLD_" not in os.environ and _mallopt(
        _M_MMAP_THRESHOLD, threshold_bytes)
    if applied:  # (inside a training loop, a checkpoint save: mappings allowed again meanwhile)
        _mallopt(_M_MMAP_MAX, _GLIBC_MMAP_MAX_DEFAULT)
    _freed_buffers_depth = int(applied)
    try:
        yield applied
    finally:
        _freed_buffers_depth = 0
        if applied:
            # buffers that glibc still served from free heap chunks (the threshold only decides
            # when the heap has none) go back too
            _settle_allocator()


def _settle_allocator() -> None:
    """glibc's settings for what runs next: its settled thresholds (32 MiB, trim at 64), or the
    training loop's heap-kept ones when inside `large_buffers_kept_in_heap`; then the heap's free
    pages are given back."""
    _mallopt(_M_MMAP_THRESHOLD, _GLIBC_MMAP_THRESHOLD_MAX)
    _mallopt(_M_MMAP_MAX, 0 if _heap_kept else _GLIBC_MMAP_MAX_DEFAULT)
    _mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM if _heap_kept else 2 * _GLIBC_MMAP_THRESHOLD_MAX)
    release_free_heap()


_heap_kept = False


@contextlib.contextmanager
def large_buffers_kept_in_heap() -> Iterator[bool]:
    """Inside (a training loop on CPU), every buffer comes from glibc's heap and freed memory stays
    there for the next step: glibc maps each buffer above its 32 MiB limit afresh (a [seq, batch,
    vocab] logits tensor is 96 MiB) and trims the heap's free top, so every step faulted its big
    buffers in again page by page - SmolLM2's KD step took 0.9-1.1 M page faults and ~2 s of kernel
    time. With the heap kept: 8.29 / 8.53 / 8.33 -> 7.30 / 7.18 / 7.48 s per step (alternating
    runs); the distill stage's peak RSS 4.41-4.50 instead of 4.21 GiB (the freed buffers are held
    for the next step instead of being returned and mapped again). Needs glibc's
    tcache off, as CPU jobs start (`cpu_allocator_env`: with it on, a freed buffer's hole is not
    always reused). On leaving, glibc's defaults are restored and the heap's free pages given back.
    A no-op on GPU and when the user set MALLOC_MMAP_MAX_. Yields whether it applied."""
    global _heap_kept
    applied = (not use_cuda() and not _heap_kept and "MALLOC_MMAP_MAX_" not in os.environ
               and _mallopt(_M_MMAP_MAX, 0))
    if applied:
        _heap_kept = True
        _mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM)
    try:
        yield applied
    finally:
        if applied:
            _heap_kept = False
            _settle_allocator()


def release_free_heap() -> None:
    """Gives the free pages inside glibc's heaps back to the OS (`malloc_trim`). Between the passes of a
    loop (a calibration batch) it keeps freed activations from piling up as fragmented, resident
    heap: SmolLM2's FP8 load + calibration peaked 0.65 GiB over the memory before loading (1.3x
    the model) in most runs instead of 0.65-1.2, for ~5% more time. A no-op on GPU and off glibc."""
    libc = None if use_cuda() else _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


_cpu_norms_registered = False


def register_cpu_norms_for_pruning() -> None:
    """Lets ModelOpt's Minitron pruning shrink the norms of megatron's local spec.

    On CPU megatron builds torch's `nn.RMSNorm` / `nn.LayerNorm` (no Apex/TE). ModelOpt's
    megatron plugin converts each norm with a shared `num_features` hyperparameter (the hidden
    size), which only its Fused/TE norm classes accept. Registers both torch norms with a dynamic
    class that does; applied once per process. (ModelOpt's own `nn.LayerNorm` entry, which owns
    its hyperparameter, is replaced while this process prunes megatron models.)
    """
    global _cpu_norms_registered
    if _cpu_norms_registered:
        return
    from modelopt.torch.nas.registry import DMRegistry

    from nemo_optim import compat

    class _DynamicTorchNorm(compat.dynamic_layer_norm_class()):
        """torch LayerNorm/RMSNorm whose width is the model's shared hidden-size hyperparameter."""

        def _setup(self, *, num_features):
            self._register_hparam("num_features", num_features)
            for attribute in ("weight", "bias"):
                if getattr(self, attribute, None) is not None:
                    self._register_dynamic_attribute(attribute, self._cut_to_active_features)
            self._register_dynamic_attribute("normalized_shape", self._get_normalized_shape)

    for norm in (torch.nn.LayerNorm, torch.nn.RMSNorm):
        if norm in DMRegistry:
            DMRegistry.unregister(norm)
        DMRegistry.register({norm: f"torch.nn.{norm.__name__}"})(_DynamicTorchNorm)
    _cpu_norms_registered = True


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
        _install_cpu_adjustments()
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
    _remove_cpu_adjustments()
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
