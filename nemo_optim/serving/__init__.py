"""Serving exports in a real engine: vLLM, run from its own venv (`make engine-venv`) in a
subprocess, so that nothing of vLLM or its transformers is imported here. `run_engine` hands it
jobs (a model directory, token-id prompts, what to record) and returns what the engine produced;
`compare_with_engine` scores the engine's prompt log-probabilities against a nemo-optim model's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import tempfile
from pathlib import Path

import torch

from nemo_optim.errors import InputError

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("engine_worker.py")
ENGINE_PYTHON_ENV = "NEMO_OPTIM_ENGINE_PYTHON"


class EngineUnavailableError(InputError):
    """The serving engine's venv is not there."""


def engine_python() -> Path | None:
    """The engine venv's interpreter: $NEMO_OPTIM_ENGINE_PYTHON, else the repo's .venv-vllm."""
    path = Path(os.environ.get(ENGINE_PYTHON_ENV) or REPO / ".venv-vllm" / "bin" / "python")
    return path if path.is_file() else None


def require_engine() -> Path:
    python = engine_python()
    if python is None:
        raise EngineUnavailableError(
            f"the vLLM engine venv is missing ({REPO / '.venv-vllm'}): run `make engine-venv`, "
            f"or set {ENGINE_PYTHON_ENV} to a Python that has vllm installed.")
    return python


def run_engine(jobs: list[dict], *, timeout_s: float = 3600, log_path: Path | None = None,
               env: dict[str, str] | None = None) -> list[dict]:
    """Runs `jobs` one after the other in one engine process (engine_worker.py documents a job)
    and returns one result per job, in order; a job that failed has an "error" line."""
    python = require_engine()
    with tempfile.TemporaryDirectory(prefix="engine_") as scratch:
        request, result = Path(scratch) / "request.json", Path(scratch) / "result.json"
        request.write_text(json.dumps({"jobs": jobs}))
        env = {**os.environ, "HF_HUB_OFFLINE": "1",
               "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
               "TOKENIZERS_PARALLELISM": "false", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
               # the worker reads the chosen kernels in vLLM's engine process (LLM.apply_model)
               "VLLM_ALLOW_INSECURE_SERIALIZATION": "1", **(env or {})}
        env.pop("PYTHONPATH", None)  # the project's packages must not shadow the engine venv's
        log = (log_path or Path(scratch) / "engine.log")
        with open(log, "w") as out:
            completed = subprocess.run([str(python), str(WORKER), str(request), str(result)], stdout=out,
                                       stderr=subprocess.STDOUT, env=env, timeout=timeout_s, cwd=scratch)
        if not result.is_file():
            tail = log.read_text().strip().splitlines()[-5:]
            raise RuntimeError(f"vLLM engine exited {completed.returncode} without results; its log ends:\n"
                               + "\n".join(tail))
        results = json.loads(result.read_text())["results"]
        causes = _root_causes(log.read_text())
        for entry in results:
            if "error" in entry and causes.get(entry["name"]):
                entry["error"] = causes[entry["name"]]
        return results


# vLLM's front end reports a failed engine process generically; the engine's own exception is in
# its log, prefixed with the process name.
_GENERIC = ("EngineDeadError", "Engine core initialization failed", "Worker failed with error", "see root cause")


def _root_causes(log: str) -> dict[str, str]:
    """job name -> the first exception line the engine's processes logged while running it."""
    from nemo_optim.serving.engine_worker import JOB_MARK

    causes = {}
    for part in log.split(JOB_MARK)[1:]:
        name, _, body = part.partition("\n")
        lines = [line.split("] ", 1)[-1].strip() if line.startswith("(") else line.strip()
                 for line in body.splitlines()]
        for index, text in enumerate(lines):
            head = text.split(":", 1)[0]
            if head.endswith(("Error", "Exception")) and " " not in head and not any(g in text for g in _GENERIC):
                if "validation error for" in text and index + 1 < len(lines):  # (pydantic: the reason is next)
                    text = f"{text}: {lines[index + 1].split(' [type=')[0]}"
                causes[name] = text[:400]
                break
    return causes


@dataclasses.dataclass
class EngineAgreement:
    """How close the engine's next-token distributions are to a reference model's, over every
    prompt position: top-1 agreement, KL(reference || engine) and the engine's greedy tokens."""

    positions: int
    top1_agreement: float
    mean_kl: float
    max_kl: float
    greedy_prefix: float | None = None
    """Mean fraction of the reference's greedy continuation that the engine's repeats before
    the two first differ (1.0: identical)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _kl(reference: torch.Tensor, engine: dict[str, float]) -> float:
    """KL(reference || engine) over the engine's listed tokens plus the rest of the vocabulary as one
    bucket: exact when the engine listed the whole vocabulary, a lower bound otherwise."""
    log_p = torch.log_softmax(reference.double(), dim=-1)
    ids = torch.tensor([int(t) for t in engine])
    log_q = torch.tensor(list(engine.values()), dtype=torch.float64)
    p = log_p[ids].exp()
    kl = float((p * (log_p[ids] - log_q)).sum())
    rest_p, rest_q = max(1.0 - float(p.sum()), 0.0), max(1.0 - float(log_q.exp().sum()), 0.0)
    if rest_p > 1e-12:
        kl += rest_p * (math.log(rest_p) - math.log(max(rest_q, 1e-300)))
    return max(kl, 0.0)


def compare_with_engine(reference_logits: torch.Tensor, engine_result: dict,
                        reference_tokens: list[list[int]] | None = None) -> EngineAgreement:
    """`reference_logits[b, i]`: the reference model's logits after prompt b's first i+1 tokens;
    the engine's prompt log-probabilities at position i+1 are its distribution for the same step."""
    top1, kls = [], []
    for b, positions in enumerate(engine_result["prompt_logprobs"]):
        for i, engine in enumerate(positions[1:]):
            if engine is None:
                continue
            reference = reference_logits[b, i].float()
            engine_top = max(engine.items(), key=lambda item: item[1])[0]
            top1.append(int(engine_top) == int(reference.argmax()))
            kls.append(_kl(reference, engine))
    greedy = None
    if reference_tokens is not None:
        prefixes = []
        for ours, theirs in zip(reference_tokens, engine_result["tokens"]):
            same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
            prefixes.append(same / max(len(ours), 1))
        greedy = sum(prefixes) / max(len(prefixes), 1)
    return EngineAgreement(positions=len(kls), top1_agreement=sum(top1) / max(len(top1), 1),
                           mean_kl=sum(kls) / max(len(kls), 1), max_kl=max(kls, default=0.0), greedy_prefix=greedy)


def reference_outputs(model: torch.nn.Module, prompts: torch.Tensor,
                      new_tokens: int) -> tuple[torch.Tensor, list[list[int]]]:
    """A nemo-optim model's logits at every prompt position and its greedy continuations: what an
    engine serving the model's export is compared with."""
    from nemo_optim.models.forward import forward_logits, greedy_tokens

    logits = forward_logits(model, torch.cat([prompts, prompts[:, :1]], dim=1))  # (a dummy label column)
    return logits, greedy_tokens(model, prompts, new_tokens)


def engine_job(name: str, model_dir: str | Path, prompts: torch.Tensor, *, dtype: str = "float32",
               new_tokens: int = 16, prompt_logprobs: int = -1, **extra) -> dict:
    """One engine_worker job: greedy continuations and prompt log-probabilities (-1: the whole
    vocabulary) of `prompts` served from `model_dir`."""
    # (absolute: the engine runs in a scratch directory)
    return {"name": name, "model": str(Path(model_dir).resolve()), "dtype": dtype, "prompts": prompts.tolist(),
            "max_tokens": new_tokens, "prompt_logprobs": prompt_logprobs, **extra}
