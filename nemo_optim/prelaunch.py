"""Checks a launcher runs before it submits a stage, so a bad setting fails in seconds instead of
after a wait in a Slurm queue.

Each stage entry carries `check_arguments(*, launch_target: LaunchTarget | None = None, **arguments)`
(the stage's own keyword arguments): it loads no model, and reads files only where `launch_target`
says the job runs on this machine (a cluster's paths may not exist here).
"""

from __future__ import annotations

import dataclasses

from nemo_optim.data.corpus import DataConfig, DataError, load_documents


@dataclasses.dataclass(frozen=True)
class LaunchTarget:
    """What the launcher knows of where a stage will run."""

    local: bool
    """The job runs on this machine (its paths are this machine's)."""
    gpus: int | None = None
    """GPUs per node the job gets; None: unknown (no hardware check)."""


def check_data_source(field: str, config: DataConfig | None, target: LaunchTarget | None) -> None:
    """A text file source exists and parses (embedded and `hf:` sources are checked when read)."""
    if config is None or target is None or not target.local:
        return
    if config.source.startswith(("embedded", "hf:")):
        return
    try:
        load_documents(config)
    except DataError as error:
        raise DataError(f"{field}: {error}") from None


def readable_model_config(model_path: str, target: LaunchTarget | None):
    """The `GPTModelConfig` of a model on this machine (a GGUF file only if already converted);
    None when the job runs elsewhere, the path is not here, or reading it would mean converting."""
    from nemo_optim.models import hf
    from nemo_optim.models.loader import read_model_config, resolve_source

    if target is None or not target.local:
        return None
    try:
        source = resolve_source(model_path)
    except hf.ModelSourceError:
        return None  # the stage says what is wrong with the path, where it runs
    if source.kind == "gguf" and hf.converted_gguf_dir(source.path) is None:
        return None
    return read_model_config(model_path)[0]
