"""Progress bars for long phases, on the main process only (tqdm, with an ETA)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Optional

import torch
import torch.distributed as dist


def _is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def progress(iterable=None, *, description: str, total: int | None = None, disable: bool = False):
    """A tqdm progress bar with an ETA for a long phase, on the main process only."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=description, dynamic_ncols=True, disable=disable or not _is_main_process())


@contextlib.contextmanager
def progress_over_layers(layers: torch.nn.ModuleList, description: str, *, keep_type: bool = False,
                         after_each: Optional[Callable[[torch.nn.Module], None]] = None) -> Iterator[None]:
    """A progress bar for code we do not own that walks `layers` (ModelOpt's exporters show none):
    inside, iterating the list reports each layer, and `after_each(layer)` runs once the walk has
    moved past that layer. Only the list object's class is swapped, and restored on leaving. With
    `keep_type`, for code that checks `type(layers) is nn.ModuleList` and walks
    `layers.children()` (ModelOpt's TensorRT-LLM exporter), the list's `children` method is
    shadowed on the instance instead."""
    plain = type(layers)

    def with_progress():
        for layer in progress(list(plain.children(layers)), description=description):
            yield layer
            if after_each is not None:
                after_each(layer)

    if keep_type:
        layers.children = with_progress
        try:
            yield
        finally:
            del layers.children
        return

    class LayersWithProgress(plain):
        def __iter__(self):
            return with_progress()

    layers.__class__ = LayersWithProgress
    try:
        yield
    finally:
        layers.__class__ = plain
