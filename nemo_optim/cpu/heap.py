"""glibc's allocator on CPU: the settings a CPU job's processes start with, and the heap settings of
a stage and of a training loop (`mallopt`, `malloc_trim`). Applied at two levels only: the stage
skeleton (`stage_heap` through `nemo_optim.cpu.adapted`, entered by `stage.stage_runtime`) and the
training loop (`large_buffers_kept_in_heap`, entered by `training.train`); library code does not
call them.
Everything here is a no-op with CUDA (activations are device memory) and off glibc.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Iterator
from typing import Optional

import torch

# glibc's mallopt parameters (malloc.h) and the values its dynamic thresholds settle at
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4
_GLIBC_MMAP_THRESHOLD_MAX = 32 * 2**20
_GLIBC_MMAP_MAX_DEFAULT = 65536
_NEVER_TRIM = 2**31 - 1  # (mallopt takes an int)


@functools.lru_cache(maxsize=1)
def _libc():  # cached: find_library runs ldconfig
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


def _settle_allocator() -> None:
    """glibc's settled thresholds (32 MiB, trim at 64) for what runs next, then the heap's free
    pages given back."""
    _mallopt(_M_MMAP_THRESHOLD, _GLIBC_MMAP_THRESHOLD_MAX)
    _mallopt(_M_MMAP_MAX, _GLIBC_MMAP_MAX_DEFAULT)
    _mallopt(_M_TRIM_THRESHOLD, 2 * _GLIBC_MMAP_THRESHOLD_MAX)
    _release_free_heap()


def _release_free_heap() -> None:
    """Gives the free pages inside glibc's heaps back to the OS (`malloc_trim`)."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


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
    always reused). The stage's trimming (`stage_heap`) pauses meanwhile. On leaving, glibc's
    defaults are restored and the heap's free pages given back.
    A no-op on GPU and when the user set MALLOC_MMAP_MAX_. Yields whether it applied."""
    global _heap_kept
    applied = (not torch.cuda.is_available() and not _heap_kept and "MALLOC_MMAP_MAX_" not in os.environ
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


TRIM_INTERVAL_S = 0.5
_stage_trimming = False


@contextlib.contextmanager
def stage_heap(trim_every_s: float = TRIM_INTERVAL_S) -> Iterator[bool]:
    """Inside (a stage on CPU), a background thread gives the free pages of glibc's heap back to
    the OS every `trim_every_s` (`malloc_trim`, which runs without Python's lock), except while a
    training loop keeps its heap (`large_buffers_kept_in_heap`). Freed activations, importer
    temporaries and exporter state dicts so do not pile up as fragmented, resident heap, whichever
    phase frees them. It replaces per-phase settings (a 1 MiB mmap threshold while loading, saving
    and exporting, a trim after every calibration batch) at the same or lower peak (measured in
    benchmarks/results/README.md, "How the costs grow"). On leaving,
    glibc's settled thresholds and a last trim. A no-op on GPU, off glibc, and when the user set
    MALLOC_TRIM_THRESHOLD_ or MALLOC_MMAP_THRESHOLD_ (trimming is then theirs). Yields whether it applied."""
    libc = None if torch.cuda.is_available() else _libc()
    applied = (libc is not None and hasattr(libc, "malloc_trim")
               and not {"MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_"} & set(os.environ))
    global _stage_trimming
    if not applied or _stage_trimming:  # (nested: the outer one trims)
        yield applied
        return
    _stage_trimming = True
    stop = threading.Event()

    def trim_until_stopped() -> None:
        while not stop.wait(trim_every_s):
            if not _heap_kept:
                libc.malloc_trim(0)

    trimmer = threading.Thread(target=trim_until_stopped, name="nemo-optim-heap-trim", daemon=True)
    trimmer.start()
    try:
        yield True
    finally:
        stop.set()
        trimmer.join()
        _stage_trimming = False
        _settle_allocator()
