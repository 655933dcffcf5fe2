"""Writes fiddle's JSON serialization of a small config tree as plain data.

NeMo 2 loads a checkpoint's model from context/io.json, a `fiddle` config graph serialized with
`fiddle._src.experimental.serialization` (format version 0.0.1). This module writes that format
for trees of `Call`s (a `fdl.Config` of a class with keyword arguments), leaves and class references,
without importing fiddle or the classes it names: nemo-optim's core library stays free of fiddle, and
nothing is imported just to name it.

Shape, as fiddle writes it: {"root": ref, "objects": {key: object}, "refcounts": {key: n},
"version"}. A Config object lists its arguments as `Attr(name='x')` items and points at a
`BuildableTraverserMetadata` object (the class, the argument names as a tuple object, empty tag
and history dicts); every object and leaf carries the `<root>.a.b` paths it is reached by, which
NeMo uses to load one part (`subpath="model"`).
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from typing import Any

from nemo_optim import compat

VERSION = "0.0.1"


@dataclasses.dataclass(frozen=True)
class ClassRef:
    """A class or function named by its import path, e.g. "torch.float32"."""

    target: str


@dataclasses.dataclass(frozen=True)
class Call:
    """`fdl.Config(target, **arguments)`; argument values are leaves (JSON scalars), ClassRefs,
    Calls or empty dicts."""

    target: str
    arguments: dict[str, Any]


def _pyref(target: str) -> dict:
    module, _, name = target.rpartition(".")
    return {"type": "pyref", "module": module, "name": name}


def _snake_case(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


EMPTY_TUPLE = {"type": _pyref("builtins.tuple"), "items": [], "metadata": None}


def serialize(root: Call) -> dict:
    """The JSON document fiddle writes for `root` (NeMo's io.json)."""
    objects: dict[str, dict] = {}
    counters: Counter = Counter()

    def new_key(stem: str) -> str:
        counters[stem] += 1
        return f"{stem}_{counters[stem]}"

    def add(stem: str, obj: dict) -> dict:
        key = new_key(stem)
        objects[key] = obj
        return {"type": "ref", "key": key}

    def empty_dict(paths: list[str] | None = None) -> dict:
        obj = {"type": _pyref("builtins.dict"), "items": [], "metadata": EMPTY_TUPLE}
        return add("dict", obj | ({"paths": paths} if paths else {}))

    def encode(value: Any, path: str) -> dict:
        if isinstance(value, Call):
            return encode_call(value, path)
        if isinstance(value, ClassRef):
            return _pyref(value.target) | {"paths": [path]}
        if isinstance(value, dict):
            if value:
                raise ValueError(f"{path}: only empty dicts are written")
            return empty_dict([path])
        if value is not None and not isinstance(value, (bool, int, float, str)):
            raise ValueError(f"{path}: {type(value).__name__} is not a JSON leaf")
        return {"type": "leaf", "value": value, "paths": [path]}

    def encode_call(call: Call, path: str) -> dict:
        names = list(call.arguments)
        # fiddle numbers objects children first
        items = [[f"Attr(name={name!r})", encode(call.arguments[name], f"{path}.{name}")] for name in names]
        argument_names = add("tuple", {"type": _pyref("builtins.tuple"),
                                       "items": [[f"Index(index={i})", name] for i, name in enumerate(names)],
                                       "metadata": None})
        metadata = add("buildable_traverser_metadata", {
            "type": _pyref(compat.FIDDLE_TRAVERSER_METADATA),
            "items": [["Attr(name='fn_or_cls')", _pyref(call.target)],
                      ["Attr(name='argument_names')", argument_names],
                      ["Attr(name='argument_tags')", empty_dict()],
                      ["Attr(name='argument_history')", empty_dict()]],
            "metadata": _pyref(compat.FIDDLE_TRAVERSER_METADATA),
        })
        return add(_snake_case(call.target.rpartition(".")[2]), {
            "type": _pyref(compat.FIDDLE_CONFIG), "items": items, "metadata": metadata, "paths": [path]})

    root_ref = encode_call(root, "<root>")
    refcounts = Counter(ref["key"] for ref in _refs([root_ref, objects]))
    return {"root": root_ref, "objects": objects, "refcounts": {key: refcounts[key] for key in objects},
            "version": VERSION}


def _refs(value: Any):
    if isinstance(value, dict):
        if value.get("type") == "ref":
            yield value
        for item in value.values():
            yield from _refs(item)
    elif isinstance(value, list):
        for item in value:
            yield from _refs(item)


def as_yaml_data(call: Call) -> dict:
    """The same tree as NeMo's context/model.yaml writes it: `_target_` and the arguments,
    classes as `{_target_, _call_: false}`."""

    def data(value: Any) -> Any:
        if isinstance(value, Call):
            return {"_target_": value.target} | {name: data(v) for name, v in value.arguments.items()}
        if isinstance(value, ClassRef):
            return {"_call_": False, "_target_": value.target}
        return value

    return data(call)
