"""Kubernetes TrainJobs checked before they are submitted, with no API server.

NeMo-Run 0.11.1's `KubeflowExecutor.get_job_body` renders a `trainer.kubeflow.org/v1alpha1`
TrainJob whose pod settings sit in `spec.podTemplateOverrides[].{targetJobs, metadata, spec}`:
the Kubeflow Trainer v2.1 API (v2.0 named them `podSpecOverrides`, v2.2 replaced both with
`runtimePatches`). `check_trainjob` renders that manifest, as the executor would submit it, and

1. walks it against the pydantic models of that API (`kubeflow-trainer-api`, pinned to 2.1.0 in
   requirements/*-constraints.txt): every key must be a field of its model (the generated models
   would drop an unknown one silently), every value must have the field's type, required fields
   must be there;
2. checks what the API server and the Trainer would refuse, or accept into a job that can never
   run, that the models do not carry: Kubernetes names, resource names (a misspelt
   `nvidia.com/gpus` is a valid extended-resource name no node offers: the pods would wait
   forever), quantities, node and process counts, the runtime reference.

The first problem is raised as a `TrainJobError`: one line naming the manifest field, the
`run.executor.*` setting it comes from, the value, and what to do. Not checked here (no cluster):
that the referenced ClusterTrainingRuntime exists, admission webhooks, quotas, scheduling, images.
"""

from __future__ import annotations

import difflib
import json
import re
import typing
from decimal import Decimal
from functools import lru_cache
from typing import Any

from nemo_optim.errors import InputError

API_PACKAGE = "kubeflow-trainer-api"
TRAINJOB_API_VERSION = "trainer.kubeflow.org/v1alpha1"
RUNTIME_KINDS = ("ClusterTrainingRuntime", "TrainingRuntime")
NUM_PROC_WORDS = ("auto", "cpu", "gpu")  # the Torch runtime's non-integer numProcPerNode values

# resources a container may name without a domain (Kubernetes' standard container resources)
STANDARD_RESOURCES = ("cpu", "memory", "ephemeral-storage")
# extended resources device plugins commonly advertise: a near miss of one of these is a typo
KNOWN_EXTENDED_RESOURCES = ("nvidia.com/gpu", "nvidia.com/gpu.shared", "amd.com/gpu", "gpu.intel.com/i915",
                            "rdma/ib", "vpc.amazonaws.com/efa", "habana.ai/gaudi", "aws.amazon.com/neuron")

_DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")

# manifest field (prefix) -> the run.executor setting it is rendered from
_SETTINGS = (
    ("metadata.name", "run.executor.train_job_basename or the recipe name"),
    ("metadata.namespace", "run.executor.namespace"),
    ("metadata.labels", "run.executor.labels"),
    ("metadata.annotations", "run.executor.annotations"),
    ("spec.runtimeRef", "run.executor.runtime_ref"),
    ("spec.trainer.numNodes", "run.executor.num_nodes"),
    ("spec.trainer.numProcPerNode", "run.executor.nprocs_per_node, default gpus_per_node"),
    ("spec.trainer.image", "run.executor.image"),
    ("spec.trainer.env", "run.executor.env_vars / env_list"),
    ("spec.trainer.resourcesPerNode.limits['nvidia.com/gpu']", "run.executor.gpus_per_node"),
    ("spec.trainer.resourcesPerNode.requests['nvidia.com/gpu']", "run.executor.gpus_per_node"),
    ("spec.trainer.resourcesPerNode.limits['cpu']", "run.executor.cpu or cpu_limits"),
    ("spec.trainer.resourcesPerNode.requests['cpu']", "run.executor.cpu or cpu_requests"),
    ("spec.trainer.resourcesPerNode.limits['memory']", "run.executor.memory or memory_limits"),
    ("spec.trainer.resourcesPerNode.requests['memory']", "run.executor.memory or memory_requests"),
    ("spec.trainer.resourcesPerNode.limits", "run.executor.extra_resource_limits"),
    ("spec.trainer.resourcesPerNode.requests", "run.executor.extra_resource_requests"),
    ("spec.trainer", "run.executor.container_kwargs"),
    ("spec.podTemplateOverrides[0].spec.volumes", "run.executor.volumes or pvc"),
    ("spec.podTemplateOverrides[0].spec.containers", "run.executor.volume_mounts or pvc_path"),
    ("spec.podTemplateOverrides[0].spec.tolerations", "run.executor.tolerations"),
    ("spec.podTemplateOverrides[0].spec.affinity", "run.executor.affinity"),
    ("spec.podTemplateOverrides[0].spec.imagePullSecrets", "run.executor.image_pull_secrets"),
    ("spec.podTemplateOverrides[0].spec", "run.executor.pod_spec_overrides"),
    ("spec.podTemplateOverrides[0].metadata", "run.executor.pod_labels / pod_annotations"),
    ("spec", "run.executor.spec_kwargs"),
)


class TrainJobError(InputError):
    """A TrainJob the Kubeflow Trainer API (or the cluster) would refuse or never run."""


def api_version() -> str:
    """The installed `kubeflow-trainer-api` version (the Trainer API the models describe)."""
    from importlib.metadata import version

    return version(API_PACKAGE)


def _setting(path: str) -> str | None:
    for prefix, setting in _SETTINGS:
        if path == prefix or path.startswith((prefix + ".", prefix + "[")):
            return setting
    return None


def _refuse(path: str, value: Any, problem: str, fix: str) -> typing.NoReturn:
    """One line: the manifest field, the executor setting it comes from, the value, the problem,
    what to do, and the API it was checked against."""
    setting = _setting(path)
    where = f"TrainJob {path or 'manifest'}" + (f" (from {setting})" if setting else "")
    shown = value if isinstance(value, (int, float)) and not isinstance(value, bool) else repr(value)
    message = f"{where}: {shown} {problem}; {fix} (Kubeflow Trainer API {api_version()}, {TRAINJOB_API_VERSION})"
    raise TrainJobError(" ".join(message.split()))


# --- 1. the Trainer API models ------------------------------------------------------------------

def _is_model(annotation) -> bool:
    from pydantic import BaseModel

    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _is_one_of(model) -> bool:
    """openapi-generator's oneOf wrappers (IntOrString, Quantity) hold the value in actual_instance."""
    return "actual_instance" in model.model_fields


def _without_none(annotation):
    if typing.get_origin(annotation) is typing.Union:
        kinds = [kind for kind in typing.get_args(annotation) if kind is not type(None)]
        if len(kinds) == 1:
            return kinds[0]
    return annotation


@lru_cache(maxsize=None)
def _adapter(annotation):
    from pydantic import TypeAdapter

    return TypeAdapter(annotation)


def _fields(model) -> dict[str, tuple[Any, bool]]:
    """JSON name -> (annotation with its constraints, required) of a generated model."""
    fields = {}
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if info.metadata:
            annotation = typing.Annotated[(annotation, *info.metadata)]
        fields[info.alias or name] = (annotation, info.is_required())
    return fields


def _type_name(annotation) -> str:
    annotation = _without_none(annotation)
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if _is_model(annotation):
        return "an object (" + annotation.__name__.removeprefix("TrainerV1alpha1").removeprefix("IoK8sApiCoreV1") + ")"
    if typing.get_origin(annotation) is list:
        return "a list"
    if typing.get_origin(annotation) is dict:
        return "a mapping"
    return f"a value of type {getattr(annotation, '__name__', annotation)}"


def _walk_model(model, value, path: str) -> None:
    if not isinstance(value, dict):
        _refuse(path, value, f"must be {_type_name(model)}", "give the fields as a mapping")
    fields = _fields(model)
    for key, item in value.items():
        where = f"{path}.{key}" if path else key
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"its fields: {', '.join(sorted(fields))}"
            _refuse(path, key, f"is not a field of {model.__name__}", hint)
        if item is not None:
            _walk(fields[key][0], item, where)
    for key, (_, required) in fields.items():
        if required and value.get(key) is None:
            _refuse(path, key, f"is a required field of {model.__name__}", "set it")


def _walk(annotation, value, path: str) -> None:
    annotation = _without_none(annotation)
    origin = typing.get_origin(annotation)
    if origin is list:
        if not isinstance(value, list):
            _refuse(path, value, "is not a list", "give a list")
        for index, item in enumerate(value):
            _walk(typing.get_args(annotation)[0], item, f"{path}[{index}]")
    elif origin is dict:
        if not isinstance(value, dict):
            _refuse(path, value, "is not a mapping", "give a mapping")
        for key, item in value.items():
            if not isinstance(key, str):
                _refuse(path, key, "is not a string key", "quote the key")
            _walk(typing.get_args(annotation)[1], item, f"{path}[{key!r}]")
    elif _is_model(annotation) and _is_one_of(annotation):
        try:
            annotation.from_json(json.dumps(value))
        except (ValueError, TypeError):  # pydantic's ValidationError is a ValueError
            kinds = " or ".join(sorted(annotation.model_fields["one_of_schemas"].default))
            _refuse(path, value, f"must be a {kinds}", "give one")
    elif _is_model(annotation):
        _walk_model(annotation, value, path)
    else:
        from pydantic import ValidationError

        try:
            _adapter(annotation).validate_python(value, strict=True)
        except ValidationError as error:
            _refuse(path, value, f"must be {_type_name(annotation)} ({error.errors()[0]['msg'].lower()})",
                    "give one")


# --- 2. what the models do not carry ------------------------------------------------------------

def _quantity(path: str, value) -> Decimal:
    from kubernetes.utils import parse_quantity

    try:
        amount = parse_quantity(value)
    except (ValueError, TypeError):
        _refuse(path, value, "is not a Kubernetes quantity",
                "write a number with an optional suffix: 16, 500m, 128Gi, 64G (not 'GB' or 'gib')")
    if amount < 0:
        _refuse(path, value, "is negative", "give a quantity >= 0")
    return amount


def _check_resource_name(path: str, name: str) -> None:
    known = (*STANDARD_RESOURCES, *KNOWN_EXTENDED_RESOURCES)
    if name in known or name.startswith("hugepages-") or name.startswith("nvidia.com/mig-"):
        return
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
    prefix, slash, short = name.rpartition("/")
    if close:
        _refuse(path, name, "is not a known resource name (a pod asking for one no node offers is never scheduled)",
                f"did you mean {close[0]!r}?")
    if not slash:
        _refuse(path, name, "is not a resource name: one without a domain must be one of "
                f"{', '.join(STANDARD_RESOURCES)} or hugepages-<size>",
                "give the device plugin's domain-qualified name, e.g. 'nvidia.com/gpu'")
    if (not _DNS1123_SUBDOMAIN.match(prefix) or not _QUALIFIED_NAME.match(short) or len(short) > 63
            or prefix == "kubernetes.io" or prefix.endswith(".kubernetes.io")):
        _refuse(path, name, "is not a valid extended resource name (domain/name, outside kubernetes.io)",
                "give the name the device plugin advertises, e.g. 'nvidia.com/gpu'")


def _check_resources(path: str, resources: dict) -> None:
    limits, requests = resources.get("limits") or {}, resources.get("requests") or {}
    amounts: dict[str, dict[str, Decimal]] = {"limits": {}, "requests": {}}
    for kind, table in (("limits", limits), ("requests", requests)):
        for name, value in table.items():
            where = f"{path}.{kind}[{name!r}]"
            _check_resource_name(f"{path}.{kind}", name)
            amount = _quantity(where, value)
            if name not in STANDARD_RESOURCES and not name.startswith("hugepages-") and amount != amount.to_integral():
                _refuse(where, value, "is not a whole number (a device is counted in units)", "give an integer")
            amounts[kind][name] = amount
    for name, request in amounts["requests"].items():
        limit = amounts["limits"].get(name)
        if limit is None:
            continue
        extended = name not in STANDARD_RESOURCES and not name.startswith("hugepages-")
        if extended and request != limit:
            _refuse(f"{path}.requests[{name!r}]", requests[name],
                    f"is not its limit {limits[name]!r} (an extended resource cannot be overcommitted)",
                    "make the request and the limit equal")
        if request > limit:
            _refuse(f"{path}.requests[{name!r}]", requests[name], f"is more than its limit {limits[name]!r}",
                    "request at most the limit")


def _check_name(path: str, value, subdomain: bool = False) -> None:
    pattern, kind, limit = ((_DNS1123_SUBDOMAIN, "DNS subdomain", 253) if subdomain
                            else (_DNS1123_LABEL, "DNS label (RFC 1123)", 63))
    if not isinstance(value, str) or not value or len(value) > limit or not pattern.match(value):
        _refuse(path, value, f"is not a Kubernetes name: a {kind} of at most {limit} characters",
                "use lowercase letters, digits and '-', starting and ending with a letter or digit")


def _check_semantics(manifest: dict) -> None:
    if manifest.get("apiVersion") != TRAINJOB_API_VERSION:
        _refuse("apiVersion", manifest.get("apiVersion"), "is not the Trainer API these models describe",
                f"render a {TRAINJOB_API_VERSION} TrainJob (NeMo-Run's KubeflowExecutor)")
    if manifest.get("kind") != "TrainJob":
        _refuse("kind", manifest.get("kind"), "is not a TrainJob", "render a TrainJob")
    metadata = manifest.get("metadata") or {}
    _check_name("metadata.name", metadata.get("name"))
    if metadata.get("namespace") is not None:
        _check_name("metadata.namespace", metadata["namespace"])
    spec = manifest.get("spec") or {}
    runtime = spec.get("runtimeRef") or {}
    _check_name("spec.runtimeRef.name", runtime.get("name"), subdomain=True)
    if runtime.get("kind") is not None and runtime["kind"] not in RUNTIME_KINDS:
        _refuse("spec.runtimeRef.kind", runtime["kind"], "is not a training runtime kind",
                f"use one of {', '.join(RUNTIME_KINDS)} (default ClusterTrainingRuntime)")
    if runtime.get("apiGroup") not in (None, "", "trainer.kubeflow.org"):
        _refuse("spec.runtimeRef.apiGroup", runtime["apiGroup"], "is not the Trainer's API group",
                "use trainer.kubeflow.org (or leave it out)")
    trainer = spec.get("trainer") or {}
    nodes = trainer.get("numNodes")
    if nodes is not None and nodes < 1:
        _refuse("spec.trainer.numNodes", nodes, "must be at least 1", "set run.executor.num_nodes=N with N >= 1")
    procs = trainer.get("numProcPerNode")
    if procs is not None and (procs not in NUM_PROC_WORDS if isinstance(procs, str) else procs < 1):
        _refuse("spec.trainer.numProcPerNode", procs, "must be a positive integer or one of "
                + ", ".join(NUM_PROC_WORDS), "set run.executor.nprocs_per_node (or gpus_per_node) to N >= 1")
    if "image" in trainer and not trainer["image"]:
        _refuse("spec.trainer.image", trainer["image"], "is empty", "set run.executor.image to a container image")
    for index, variable in enumerate(trainer.get("env") or []):
        if not _ENV_NAME.match(variable.get("name", "")):
            _refuse(f"spec.trainer.env[{index}].name", variable.get("name"), "is not a valid environment variable name",
                    "use letters, digits, '_', '-' and '.', not starting with a digit")
    if trainer.get("resourcesPerNode"):
        _check_resources("spec.trainer.resourcesPerNode", trainer["resourcesPerNode"])
    for index, override in enumerate(spec.get("podTemplateOverrides") or []):
        for job, target in enumerate(override.get("targetJobs") or []):
            _check_name(f"spec.podTemplateOverrides[{index}].targetJobs[{job}].name", target.get("name"))
        pod = override.get("spec") or {}
        volumes = [volume.get("name") for volume in pod.get("volumes") or []]
        for number, name in enumerate(volumes):
            _check_name(f"spec.podTemplateOverrides[{index}].spec.volumes[{number}].name", name)
        for number, container in enumerate(pod.get("containers") or []):
            for mount_index, mount in enumerate(container.get("volumeMounts") or []):
                where = f"spec.podTemplateOverrides[{index}].spec.containers[{number}].volumeMounts[{mount_index}]"
                if not str(mount.get("mountPath", "")).startswith("/"):
                    _refuse(f"{where}.mountPath", mount.get("mountPath"), "must be an absolute path",
                            "give a path starting with '/'")


def check_manifest(manifest: dict) -> None:
    """Raises TrainJobError (one line) unless `manifest` is a TrainJob of the installed Trainer
    API that the cluster would accept and could schedule (as far as can be told without one)."""
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

    _walk_model(TrainerV1alpha1TrainJob, manifest, "")
    _check_semantics(manifest)
    TrainerV1alpha1TrainJob.from_dict(manifest)  # the models' own construction, as a client would


# --- the executor's manifest ----------------------------------------------------------------------

def is_kubeflow(executor) -> bool:
    return any(kind.__name__ == "KubeflowExecutor" for kind in type(executor).__mro__)


def trainjob_manifest(executor, task=None, name: str = "task") -> dict:
    """The TrainJob `executor` would submit for `task` (a run.Partial; None: a placeholder command),
    rendered without a cluster and without writing anything: NeMo-Run's own packaging of the task
    with the config inline, or, with a work-dir claim, the launch script on the claim it would run.
    The name is the one a launch derives (its random suffix as zeros)."""
    if executor.workdir_pvc:
        command = ["/bin/bash", f"{executor.code_dir}/launch.sh"]
    elif task is None:
        command = ["python", "-m", "nemo_run.core.runners.fdl_runner"]
    else:
        from nemo_run.run.torchx_backend.packaging import package

        role = package(name, task, executor=executor, serialize_to_file=False).roles[0]
        macros = executor.macro_values()
        if macros:
            role = macros.apply(role)
        command = [role.entrypoint, *role.args]
    base = re.sub(r"[^a-z0-9-]+", "-", (executor.train_job_basename or name or "job").lower()).strip("-")
    k8s_name = f"{base[:26].strip('-') or 'job'}-000000"
    return executor.get_job_body(k8s_name, command)


def check_trainjob(executor, task=None, name: str = "task") -> None:
    """The launchers' pre-submission check: for a Kubeflow executor, its TrainJob for `task`
    must fit the Trainer API (`check_manifest`); any other executor passes untouched."""
    if not is_kubeflow(executor):
        return
    check_manifest(trainjob_manifest(executor, task, name))
