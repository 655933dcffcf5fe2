"""nemo_optim.cpu: the CPU allocator settings, checked in a fresh process (pytest's own heap would
blur a resident-memory measurement), and where the CPU adaptations may be applied."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

# Buffers of 4 MiB (a SmolLM2 layer's activations or weight copy) interleaved with small buffers
# that stay alive, as calibration leaves quantizer state between activations; then the large
# ones are freed. Reports how much of their memory is still resident a few trim intervals later:
# inside a stage's adaptations and after them.
_HELD_AFTER_FREE = r"""
import json, time, torch
from pathlib import Path
from nemo_optim import cpu, runtime
from nemo_optim.cpu import heap

def rss_mib():
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024

def held_after_free():
    before = rss_mib()
    large, small = [], []
    for _ in range(64):
        large.append(torch.ones(4 * 2**20, dtype=torch.uint8))
        small.append(torch.ones(16 * 2**10, dtype=torch.uint8))
    grown = rss_mib() - before
    del large
    time.sleep(4 * heap.TRIM_INTERVAL_S)
    return {"grown_mib": grown, "held_mib": rss_mib() - before}

with runtime.parallel_runtime():
    torch.ones(8 * 2**20, dtype=torch.uint8)  # freed at once: glibc's default threshold rises above 4 MiB
    with heap.stage_heap() as applied, cpu.adapted():  # (nested: the skeleton's entry inside)
        inside = held_after_free()
    after = held_after_free()
print(json.dumps({"applied": applied, "inside": inside, "after": after}))
"""


def _measure(env_overrides: dict[str, str]) -> dict:
    from nemo_optim.cpu import cpu_allocator_env

    done = subprocess.run([sys.executable, "-c", _HELD_AFTER_FREE], capture_output=True, text=True,
                          env={**os.environ, **cpu_allocator_env(), **env_overrides}, check=True, timeout=300)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_stage_returns_freed_heap_to_the_os_and_loops_keep_the_heap_after():
    measured = _measure({})
    assert measured["applied"] is True
    assert measured["inside"]["grown_mib"] > 200 and measured["after"]["grown_mib"] > 200
    assert measured["inside"]["held_mib"] < 16, measured  # the stage's trims gave the freed heap back
    # after: glibc's settled thresholds and no trimming, so loops that re-allocate reuse the heap
    assert measured["after"]["held_mib"] > 200, measured


def test_a_users_own_malloc_setting_is_left_alone():
    measured = _measure({"MALLOC_MMAP_THRESHOLD_": str(32 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(2**30)})
    assert measured["applied"] is False
    assert measured["inside"]["held_mib"] > 200, measured


# A training step's big buffers (a 96 MiB logits tensor) allocated, used and freed twice: the
# page faults of the second round, in a stage with the training loop's setting and without it.
_FAULTS_OF_A_REUSED_BUFFER = r"""
import json, resource, time, torch
from nemo_optim import cpu, runtime
from nemo_optim.cpu import heap

def second_round_faults(pause=0.0):
    for round in range(2):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        buffer = torch.ones(96 * 2**20, dtype=torch.uint8)
        del buffer
        time.sleep(pause)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

with runtime.parallel_runtime(), cpu.adapted():
    plain = second_round_faults()
    with heap.large_buffers_kept_in_heap() as applied:
        kept = second_round_faults()
        kept_while_the_stage_trims = second_round_faults(pause=4 * heap.TRIM_INTERVAL_S)
    after = second_round_faults()
print(json.dumps({"applied": applied, "plain": plain, "kept": kept,
                  "kept_while_the_stage_trims": kept_while_the_stage_trims, "after": after}))
"""


def test_a_training_loop_reuses_its_big_buffers_instead_of_faulting_them_in_again():
    """In the environment the executors start CPU jobs with (glibc's tcache off: with it on, the
    slack chunks of torch's aligned allocations can keep a freed buffer's hole from being reused,
    as in `cpu_allocator_env`'s story)."""
    from nemo_optim.cpu import cpu_allocator_env

    done = subprocess.run([sys.executable, "-c", _FAULTS_OF_A_REUSED_BUFFER], capture_output=True, text=True,
                          env={**os.environ, **cpu_allocator_env()}, check=True, timeout=300)
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    pages = 96 * 2**20 // 4096
    assert measured["applied"] is True
    assert measured["plain"] > 0.9 * pages, measured  # mapped afresh: every page faulted in again
    assert measured["kept"] < 0.05 * pages, measured  # the freed heap memory is reused
    assert measured["kept_while_the_stage_trims"] < 0.05 * pages, measured  # the stage's trims paused
    assert measured["after"] > 0.9 * pages, measured  # glibc's defaults again


_LAYERS = Path(__file__).resolve().parents[1]
# the allocator calls, only in nemo_optim/cpu/ and at the two levels that apply them
_ALLOCATOR_CALLS = re.compile(r"\b(mallopt|malloc_trim|freed_buffers_returned_to_os|large_buffers_kept_in_heap|"
                              r"release_free_heap|_release_free_heap|stage_heap|_settle_allocator)\b")
_MAY_APPLY = {"nemo_optim/stage.py", "nemo_optim/training.py"}


def test_allocator_settings_are_applied_by_the_stage_skeleton_and_the_training_loop_only():
    calls = [f"{path.relative_to(_LAYERS)}:{number}: {line.strip()}"
             for top in ("nemo_optim", "benchmarks", "recipes") for path in sorted((_LAYERS / top).rglob("*.py"))
             if not path.relative_to(_LAYERS).as_posix().startswith("nemo_optim/cpu/")
             and path.relative_to(_LAYERS).as_posix() not in _MAY_APPLY
             for number, line in enumerate(path.read_text().splitlines(), 1) if _ALLOCATOR_CALLS.search(line)]
    assert calls == []


def test_the_cpu_adaptations_import_no_heavy_library():
    """`nemo_optim.cpu` is imported by the executors (`cpu_allocator_env`) and every stage: no megatron,
    ModelOpt or transformers at import time."""
    code = ("import sys, nemo_optim.cpu, nemo_optim.runtime, nemo_optim.progress; "
            "print([m for m in ('megatron', 'modelopt', 'transformers') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert done.stdout.strip() == "[]"


def test_adapted_is_a_no_op_with_cuda(monkeypatch):
    import torch

    from nemo_optim import cpu
    from nemo_optim.cpu import heap

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(heap, "_mallopt", lambda *a: pytest.fail("mallopt called with CUDA"))
    monkeypatch.setattr(heap, "_libc", lambda: pytest.fail("libc used with CUDA"))
    with cpu.adapted():
        assert not cpu.devices.installed()
