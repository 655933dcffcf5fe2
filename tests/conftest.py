from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from tiny_models import ARCHITECTURES, make_tiny_hf_model, train_tiny_tokenizer  # noqa: E402


def pytest_collection_modifyitems(config, items):
    from nemo_optim import compat

    if not compat.minitron_needs_transformer_engine():
        return
    skip = pytest.mark.skip(reason=f"Minitron pruning on megatron's local layers: nvidia-modelopt "
                                   f"{compat.installed('nvidia-modelopt')} (>= 0.44) prunes only Transformer Engine "
                                   f"layers, which need CUDA; the previous leg (ModelOpt 0.43) tests it")
    for item in items:
        if item.get_closest_marker("minitron"):
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    # GGUF conversions and other caches go to a per-session directory, never $HOME.
    os.environ.setdefault("NEMO_OPTIM_CACHE", str(tmp_path_factory.mktemp("cache")))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import nemo_run

    nemo_run.config.set_nemorun_home(str(tmp_path_factory.mktemp("nemo_run_home")))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return train_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_hf_models(tmp_path_factory, tiny_tokenizer) -> dict[str, Path]:
    """arch -> HF directory of a random tiny model with a real tokenizer."""
    root = tmp_path_factory.mktemp("tiny_hf")
    return {arch: make_tiny_hf_model(arch, root / arch, tiny_tokenizer) for arch in ARCHITECTURES}


@pytest.fixture(autouse=True)
def _engine_only_where_marked(request, monkeypatch):
    # Serving in vLLM takes a minute per engine start: only tests marked `engine` get the engine
    # (the report, for one, serves its rows whenever the engine venv exists).
    if request.node.get_closest_marker("engine") is None:
        from nemo_optim.serving import ENGINE_PYTHON_ENV

        monkeypatch.setenv(ENGINE_PYTHON_ENV, "/nonexistent/engine-python")


@pytest.fixture
def runtime_single():
    """megatron parallel state for one process; torn down after the test."""
    from nemo_optim import runtime

    with runtime.parallel_runtime(runtime.ParallelConfig()) as config:
        yield config


@pytest.fixture
def kubeconfig(tmp_path, monkeypatch):
    """A kubeconfig that parses, for Kubeflow executors (no cluster here); NEMO_OPTIM_K8S_* unset."""
    import os

    from kube import write_kubeconfig

    path = write_kubeconfig(tmp_path / "kubeconfig")
    monkeypatch.setenv("KUBECONFIG", str(path))
    # the kubernetes client reads $KUBECONFIG once, when it is imported
    from kubernetes.config import kube_config

    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(path))
    for name in [name for name in os.environ if name.startswith("NEMO_OPTIM_K8S_")]:
        monkeypatch.delenv(name)
    return path
