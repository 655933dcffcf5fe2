"""What running on a CPU needs, in one place; nothing here does anything with CUDA.

- `devices`: `torch.cuda` answers and a torch function mode that put megatron's and ModelOpt's
  "cuda" tensors on the CPU (installed by the parallel set-up, `runtime.initialize`, which needs
  them from megatron's first call),
- `heap`: glibc's allocator: the environment CPU jobs start with (`cpu_allocator_env`, for the
  executors), the stage's heap setting and the training loop's (`large_buffers_kept_in_heap`),
- `pruning_norms`: ModelOpt's Minitron pruning on torch's norms (megatron's local spec),
- `sharded_views`: megatron's checkpoint writer takes CPU views whole instead of copying them.

Applied at one level: the stage skeleton enters `adapted()` (`stage.stage_runtime`) and the
training loop `large_buffers_kept_in_heap()` (`training.train`); library code calls neither.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from nemo_optim.cpu import devices, heap
from nemo_optim.cpu.heap import cpu_allocator_env, large_buffers_kept_in_heap

__all__ = ["adapted", "cpu_allocator_env", "devices", "heap", "large_buffers_kept_in_heap"]


@contextlib.contextmanager
def adapted() -> Iterator[None]:
    """A stage's CPU adaptations, undone on leaving: the device shims (left as they are when the
    parallel set-up already installed them) and the stage's heap setting (`heap.stage_heap`).
    A no-op with CUDA."""
    with devices.cuda_on_cpu(), heap.stage_heap():
        yield
