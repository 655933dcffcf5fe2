"""The GPU acceptance kit's CPU smoke run (`python -m benchmarks.gpu_acceptance --device cpu --tiny`), so
the kit cannot rot between GPU runs: it exits 0, reports every check, the checks that run on a CPU pass,
and the CUDA-only ones are skipped with a one-line reason; and the wheel list for a GPU node."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_wheels
from benchmarks.gpu_acceptance import CHECKS, NAME

REPO = Path(__file__).resolve().parents[1]


def test_cpu_tiny_run_reports_every_check(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_acceptance", "--device", "cpu", "--tiny", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    results = json.loads((tmp_path / f"{NAME}.json").read_text())
    assert (results["device"], results["tiny"], results["within_budget"]) == ("cpu", True, True)
    rows = {row["check"]: row for row in results["rows"]}
    assert list(rows) == [check.name for check in CHECKS]
    for check in CHECKS:
        row = rows[check.name]
        assert row["status"] == check.on_cpu, row
        if row["status"] == "skipped":
            assert row["reason"] and "\n" not in row["reason"], row
        else:
            assert row["reason"] is None and row["summary"], row
    assert "CUDA" in rows["ptq[nvfp4]"]["reason"] and "Transformer Engine" in rows["ptq[fp8_kv_cache]"]["reason"]
    assert rows["parity_fp32[smollm2-135m]"]["details"]["gpu_vs_cpu"].startswith("not measured")
    assert rows["eagle3_lossless"]["details"]["lossless"] is True
    assert rows["recipes_8gpu_settings"]["details"]["source"] == "read from the recipes"
    table = (tmp_path / f"{NAME}.md").read_text()
    assert all(f"| {check.name} | {check.on_cpu} |" in table for check in CHECKS)


def test_gpu_wheels_pins_the_current_leg_and_prints_one_offline_install_line():
    """No download here: the wheel list comes from the current leg's pins, and only its interpreter makes it."""

    pins = gpu_wheels.pinned_versions()
    if all(gpu_wheels._installed(name) == pins[name] for name in gpu_wheels.PINNED):
        specs = gpu_wheels.wanted([])
        assert specs[:2] == [f"{name}=={pins[name]}" for name in gpu_wheels.PINNED]
        assert [spec.split("==")[0] for spec in specs[2:]] == list(gpu_wheels.NOT_IN_IMAGE)
    else:
        with pytest.raises(gpu_wheels.WheelsError, match="current leg's interpreter"):
            gpu_wheels.wanted([])
    first, run = gpu_wheels.install_line(gpu_wheels.DEFAULT_OUT).splitlines()
    assert first == 'pip install --no-index --no-deps --target "$PWD/gpu-site" build/gpu-wheels/*.whl'
    assert run.endswith("python -m benchmarks.gpu_acceptance --out benchmarks/results")
