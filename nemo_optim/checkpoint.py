"""The native checkpoint: one directory a stage writes and the next one reads.

    <dir>/
      manifest.json        format, library versions, content hash, what produced it
      model_config.json    GPTModelConfig (the real shapes, also after pruning)
      hf/                  HF config.json, generation config and tokenizer files (for export)
      weights/             megatron dist-checkpoint (any TP/PP can load it)
      weights/modelopt_state/   ModelOpt modes (quantizers, ...) when the model was converted

Written into `.<dir>.partial` and renamed when complete, so a directory with a manifest is
always whole. Weights are resharded on load: save at TP=1, load at TP=2.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from nemo_optim import runtime
from nemo_optim.cpu.sharded_views import views_handed_over_whole
from nemo_optim.errors import InputError
from nemo_optim.models import sharded
from nemo_optim.models.config import GPTModelConfig

FORMAT = "nemo-optim-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODEL_CONFIG = "model_config.json"
HF_DIR = "hf"
WEIGHTS_DIR = "weights"
MODELOPT_STATE_DIR = "modelopt_state"  # (written by ModelOpt inside WEIGHTS_DIR)
HF_METADATA_FILES = ("config.json", "generation_config.json")


class CheckpointError(InputError):
    """A checkpoint directory that is missing, incomplete or of another format."""


@contextlib.contextmanager
def atomic_directory(path: str | Path, collective: bool = True) -> Iterator[Path]:
    """Yields a temp dir beside `path`; on success it replaces `path`, on error it is removed.

    collective=True: every rank enters (barriers inside), the main rank renames.
    """
    path = Path(path)
    partial = path.parent / f".{path.name}.partial"
    main = runtime.is_main_process() or not collective
    sync = runtime.barrier if collective else (lambda: None)
    if main:
        shutil.rmtree(partial, ignore_errors=True)  # leftover of a crashed run
        partial.mkdir(parents=True)
    sync()
    try:
        yield partial
        sync()
    except BaseException:
        if main:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    if main:
        if path.exists():
            old = path.parent / f".{path.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
            partial.rename(path)
            shutil.rmtree(old)
        else:
            partial.rename(path)
    sync()


def library_versions() -> dict[str, str]:
    versions = {}
    for dist_name in ("nemo-optim", "torch", "megatron-core", "nvidia-modelopt", "transformers"):
        try:
            versions[dist_name] = metadata.version(dist_name)
        except metadata.PackageNotFoundError:
            versions[dist_name] = "not installed"
    return versions


def directory_digest(path: Path) -> str:
    """sha256 over every file's relative path and bytes, in sorted order."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode())
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


@dataclass
class CheckpointInfo:
    path: Path
    model_config: GPTModelConfig
    manifest: dict[str, Any]

    @property
    def hf_dir(self) -> Path:
        return self.path / HF_DIR

    @property
    def weights_dir(self) -> Path:
        return self.path / WEIGHTS_DIR


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def read_checkpoint_info(path: str | Path) -> CheckpointInfo:
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(
            f"{path}: not a nemo-optim checkpoint (no {MANIFEST}); an interrupted save leaves "
            f"only a hidden .partial directory. Re-run the stage that writes it."
        )
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: manifest format {manifest.get('format')!r} v{manifest.get('format_version')} "
            f"is not readable by this nemo-optim (reads {FORMAT} v<={FORMAT_VERSION})."
        )
    return CheckpointInfo(path, GPTModelConfig.load(path / MODEL_CONFIG), manifest)


def stored_quantization_settings(path: str | Path) -> dict[str, Any] | None:
    """The quantization settings a native checkpoint's quantizers were calibrated with: written
    by `ptq`, and passed on by stages that train a quantized model further (QAT, QAD). None for
    an unquantized model and for anything that is not a native checkpoint."""
    if not (Path(path) / MANIFEST).is_file():
        return None
    return read_checkpoint_info(path).manifest.get("producer", {}).get("quantization_config")


def written_by(path: str | Path, producer: dict[str, Any]) -> bool:
    """Whether `path` is a complete native checkpoint whose producer had `producer`'s settings
    (a stage's earlier run with the same arguments, which the rerun may go on from)."""
    if not is_checkpoint(path):
        return False
    written = read_checkpoint_info(path).manifest.get("producer", {})
    return all(written.get(key) == value for key, value in json.loads(json.dumps(producer)).items())


HF_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja",
)


def copy_hf_metadata(source_hf_dir: Path, target: Path) -> None:
    """config.json, generation config and tokenizer files; never weights."""
    target.mkdir(parents=True, exist_ok=True)
    for name in HF_METADATA_FILES + HF_TOKENIZER_FILES:
        if (source_hf_dir / name).is_file():
            shutil.copy2(source_hf_dir / name, target / name)


def fork_writer_results_queue() -> None:
    """megatron's dist-checkpoint writer collects its workers' results through a Manager queue it
    starts with the 'spawn' method: a fresh interpreter that re-imports the entry script, torch and
    megatron (~5 s on CPU, once per process). A Manager forked from this process serves the same
    queue without the re-import (megatron forks its writer workers from here too). The Manager
    lets go of this process's stdout/stderr and exits when this process dies (even by SIGKILL), so
    nothing reading this process's output waits on it."""
    import multiprocessing

    from nemo_optim import compat

    filesystem_async = compat.writer_results_queue_module()
    if filesystem_async._results_queue is None:
        from multiprocessing.managers import SyncManager

        manager = SyncManager(ctx=multiprocessing.get_context("fork"))
        manager.start(_serve_only_while_parent_lives, (os.getpid(),))
        filesystem_async._results_queue = manager.Queue()


def save_dist_checkpoint(sharded_state_dict: dict, directory: str | Path) -> None:
    """megatron's dist-checkpoint save (collective) in the layout every tested megatron reads:
    with its common (non-sharded) state in `common.pt`, which megatron >= 0.17 keeps only inside
    the `.distcp` files and megatron <= 0.16 (NeMo 2.7's 0.15 among them) needs."""
    from megatron.core import dist_checkpointing

    fork_writer_results_queue()
    dist_checkpointing.save(sharded_state_dict, str(directory))
    write_common_state_file(directory)


def write_common_state_file(directory: str | Path) -> None:
    """Writes `common.pt` into a dist-checkpoint saved by megatron >= 0.17 (collective)."""
    from nemo_optim import compat

    if compat.common_state_written_to_file():
        return
    common = Path(directory) / "common.pt"
    if runtime.is_main_process() and not common.exists():
        torch.save(compat.load_common_state_function()(str(directory)), common)
    runtime.barrier()


def _serve_only_while_parent_lives(parent: int) -> None:
    import ctypes
    import gc
    import signal

    gc.freeze()  # never traverse the objects inherited from the forked (multi-threaded) parent

    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    try:  # Linux: the kernel ends this server when the process that forked it dies
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(0)


def save_checkpoint(
    model: torch.nn.Module,
    model_config: GPTModelConfig,
    path: str | Path,
    source_hf_dir: str | Path,
    producer: dict[str, Any] | None = None,
) -> Path:
    """Saves `model` (collective: every rank calls it) as a native checkpoint at `path`."""
    from megatron.core import parallel_state
    from modelopt.torch.opt.plugins.mcore_dist_checkpointing import save_sharded_modelopt_state

    path = Path(path)
    with atomic_directory(path) as tmp:
        weights = tmp / WEIGHTS_DIR
        if runtime.is_main_process():
            weights.mkdir()
        runtime.barrier()
        fork_writer_results_queue()  # before the state dict exists: the fork keeps no copy of its pages
        sharded_state_dict = sharded.sharded_state_dict(model)
        views_handed_over_whole(sharded_state_dict)
        save_dist_checkpoint(sharded_state_dict, weights)
        del sharded_state_dict
        save_sharded_modelopt_state([model], str(weights))
        if (weights / MODELOPT_STATE_DIR).is_dir():  # (ModelOpt 0.43 reads only its common.pt)
            write_common_state_file(weights / MODELOPT_STATE_DIR)
        if runtime.is_main_process():
            model_config.save(tmp / MODEL_CONFIG)
            copy_hf_metadata(Path(source_hf_dir), tmp / HF_DIR)
            manifest = {
                "format": FORMAT,
                "format_version": FORMAT_VERSION,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "versions": library_versions(),
                "saved_with": {
                    "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
                    "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
                },
                "num_parameters": model_config.num_parameters(),
                "content_sha256": directory_digest(tmp),
                "producer": producer or {},
            }
            # The manifest is written last: its presence marks a complete checkpoint.
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def load_checkpoint_weights(model: torch.nn.Module, info: CheckpointInfo) -> torch.nn.Module:
    """Restores ModelOpt modes (if any) and then weights into a freshly built `model`.

    Returns the model, which ModelOpt may have converted (quantized modules etc.).
    """
    from megatron.core import dist_checkpointing
    from modelopt.torch.opt.plugins.mcore_dist_checkpointing import restore_sharded_modelopt_state

    wrapped = [model]
    restore_sharded_modelopt_state(wrapped, str(info.weights_dir))
    model = wrapped[0]
    state_dict = dist_checkpointing.load(sharded.sharded_state_dict(model), str(info.weights_dir))
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    # _extra_state entries (TE / ModelOpt bookkeeping) may legitimately be absent
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointError(f"{info.path}: weights do not fit the model built from model_config.json: "
                              f"missing {missing[:5]}, unexpected {unexpected[:5]}.")
    return model
