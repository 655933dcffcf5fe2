"""Quantization at TP/PP > 1 is exact: every format x export calibrated at TP=2, PP=2 or both
exports what one process exports, and a quantized checkpoint evaluates the same at TP=2 as at TP=1.

Oracle: the same cases in one process (tests/distributed/ptq_matrix_worker.py). What may differ:
- statistics of activations (input scales; SmoothQuant's scales, folded into weight scales and
  norms) come from matmuls that TP splits differently: a few float ulps; integer and FP8 codes
  are equal;
- AWQ (int4_awq, w4a8_awq) searches its scales per TP shard (ModelOpt averages the column-parallel
  shards' scales and picks each shard's alpha on that shard's output), as GPTQ-lite sees a shard's
  Hessian: close, not equal, and measured here;
- fp8_pc_pt quantizes activations per token at run time: a row-parallel layer's TP shards each
  take the max over their half of the token's features.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "distributed" / "ptq_matrix_worker.py"
EXPORTS = {"fp8": ("hf", "trtllm", "compressed_tensors"), "fp8_pc_pt": ("trtllm", "compressed_tensors"),
           "int8": ("trtllm", "compressed_tensors"), "int8_sq": ("trtllm", "compressed_tensors"),
           "int4": ("trtllm", "compressed_tensors"), "int4_awq": ("trtllm", "compressed_tensors"),
           "w4a8_awq": ("trtllm",)}
CASES = [[algorithm, export] for algorithm, exports in EXPORTS.items() for export in exports]
PER_SHARD_SEARCH = ("int4_awq", "w4a8_awq")
WEIGHT_STATISTICS_ONLY = ("fp8_pc_pt", "int4")  # no calibrated activation statistic: bitwise


def _run(model: Path, out: Path, processes: int, tp: int = 1, pp: int = 1, evaluate: Path | None = None) -> None:
    command = [sys.executable, str(WORKER), "--model", str(model), "--out", str(out), "--cases", json.dumps(CASES),
               "--tp", str(tp), "--pp", str(pp)]
    if processes > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                   str(processes), *command[1:]]
    command += ["--evaluate", str(evaluate)] if evaluate else []
    result = subprocess.run(command, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def one_process(tiny_hf_models, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("matrix") / "one_process"
    _run(tiny_hf_models["llama"], out, processes=1, evaluate=out)
    return out


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    merged = {}
    for file in sorted(path.glob("*.safetensors")):
        merged.update(load_file(str(file)))
    return merged


def _largest_relative_difference(expected: torch.Tensor, got: torch.Tensor) -> float:
    difference = (expected.float() - got.float()).abs()
    return (difference / expected.float().abs().clamp_min(torch.finfo(torch.float32).tiny)).max().item()


def _compare_exports(expected_dir: Path, got_dir: Path, algorithm: str) -> float:
    """Asserts what must hold for every case; returns the largest relative difference of a tensor."""
    for expected_file in expected_dir.glob("*.json"):
        assert json.loads((got_dir / expected_file.name).read_text()) == json.loads(expected_file.read_text())
    expected, got = _tensors(expected_dir), _tensors(got_dir)
    assert sorted(got) == sorted(expected)
    largest = 0.0
    for name, tensor in expected.items():
        assert (got[name].dtype, got[name].shape) == (tensor.dtype, tensor.shape), name
        if torch.equal(got[name], tensor):
            continue
        assert algorithm not in WEIGHT_STATISTICS_ONLY, f"{name}: not bitwise equal"
        if algorithm in PER_SHARD_SEARCH:  # (its integer codes follow the scales)
            if tensor.dtype.is_floating_point and tensor.element_size() >= 2:
                largest = max(largest, _largest_relative_difference(tensor, got[name]))
            continue
        largest = max(largest, _largest_relative_difference(tensor, got[name]))
        # codes (integer, FP8) are equal; float scales and norms within a few ulps of their dtype
        assert tensor.dtype.is_floating_point and tensor.element_size() >= 2, f"{name}: codes differ"
        torch.testing.assert_close(got[name], tensor, rtol=8 * torch.finfo(tensor.dtype).eps, atol=0, msg=name)
    return largest


@pytest.mark.distributed
@pytest.mark.parametrize("tp,pp", [pytest.param(2, 1, id="tp2", marks=pytest.mark.long),
                                   pytest.param(1, 2, id="pp2", marks=pytest.mark.long),
                                   pytest.param(2, 2, id="tp2pp2", marks=pytest.mark.long)])
def test_every_format_and_export_at_tp_pp_equals_one_process(tp, pp, one_process, tiny_hf_models, tmp_path, capsys):
    parallel = tmp_path / f"tp{tp}pp{pp}"
    _run(tiny_hf_models["llama"], parallel, processes=tp * pp, tp=tp, pp=pp, evaluate=one_process)
    measured = {}
    for algorithm, export in CASES:
        measured[f"{algorithm}-{export}"] = _compare_exports(one_process / f"{algorithm}-{export}",
                                                             parallel / f"{algorithm}-{export}", algorithm)
    for algorithm in PER_SHARD_SEARCH:  # close, not equal (TP) - equal at TP=1
        relative = measured[f"{algorithm}-trtllm"]
        assert (relative == 0.0) if tp == 1 else (0.0 < relative < 0.25), (algorithm, relative)
    # the one-process checkpoints evaluated at this TP x PP: the same logits as at TP=1
    logits = {}
    for algorithm in EXPORTS:
        expected = torch.load(one_process / f"{algorithm}-logits.pt")
        logits[algorithm] = (torch.load(parallel / f"{algorithm}-logits.pt") - expected).abs().max().item()
        per_token_shards = algorithm == "fp8_pc_pt" and tp > 1
        assert logits[algorithm] < (0.05 if per_token_shards else 1e-5), (algorithm, logits[algorithm])
    with capsys.disabled():
        print(f"\nTP={tp} PP={pp}: largest relative difference of an exported tensor {measured}; "
              f"max |logit difference| of the TP=1 checkpoints evaluated here {logits}")
