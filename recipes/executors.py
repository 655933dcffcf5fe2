"""Executor factories: `run.executor=NAME` for launch.py, `nemo llm ...` and the experiments.

Cluster settings may come from the environment, so a cluster profile is a file of exports:

    NEMO_OPTIM_SLURM_ACCOUNT, _PARTITION, _TIME, _NODES, _GPUS_PER_NODE, _NTASKS_PER_NODE,
    _CONTAINER_IMAGE, _CONTAINER_MOUNTS (comma-separated), _HOST / _USER (SSH tunnel; unset:
    submit from this machine), _JOB_DIR, _PACKAGER (git | none)
    NEMO_OPTIM_K8S_NAMESPACE, _IMAGE, _NUM_NODES, _GPUS_PER_NODE, _CPU, _MEMORY, _PVC, _PVC_PATH
    NEMO_OPTIM_SKYPILOT_CLOUD / _GPUS, NEMO_OPTIM_DGXC_*, NEMO_OPTIM_LEPTON_* (pass-through; Skypilot
    needs `pip install nemo_run[skypilot]`)

A value given as an argument (or `run.executor.x=` on the command line) wins over the environment.
"""

import os
from typing import Optional

import nemo_run as run

from nemo_optim.cpu import cpu_allocator_env


def _env(name: str, default: Optional[str] = None) -> Optional[str]:
    return os.environ.get(name) or default


def _env_int(name: str, default: Optional[int]) -> Optional[int]:
    value = os.environ.get(name)
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} must be an integer.") from None


def cpu_job_env(**variables: str) -> dict[str, str]:
    """`variables` and the allocator setting of a CPU job (`nemo_optim.cpu.cpu_allocator_env`)."""
    return {**variables, **cpu_allocator_env()}


@run.cli.factory
@run.autoconvert
def local() -> run.LocalExecutor:
    """One process on this machine."""
    return run.LocalExecutor(ntasks_per_node=1, env_vars=cpu_job_env())


@run.cli.factory
@run.autoconvert
def torchrun(ntasks_per_node: int = 2) -> run.LocalExecutor:
    """`ntasks_per_node` processes on this machine through torchrun (gloo on CPU)."""
    return run.LocalExecutor(ntasks_per_node=ntasks_per_node, launcher="torchrun",
                            env_vars=cpu_job_env(OMP_NUM_THREADS="1"))


@run.cli.factory
def slurm(
    account: Optional[str] = None,
    partition: Optional[str] = None,
    nodes: Optional[int] = None,
    ntasks_per_node: Optional[int] = None,
    gpus_per_node: Optional[int] = None,
    time: Optional[str] = None,
    container_image: Optional[str] = None,
    container_mounts: Optional[str] = None,
    host: Optional[str] = None,
    user: Optional[str] = None,
    job_dir: Optional[str] = None,
    packager: Optional[str] = None,
) -> run.Config[run.SlurmExecutor]:
    """A Slurm job: sbatch through an SSH tunnel to `host`, or on this machine when no host is
    set (a login node, or the test cluster). More than one task per node, or more than one node,
    runs torchrun: one agent per node (srun), its rendezvous on the first node of the allocation
    (NeMo-Run: `hostname --ip-address` there), node rank = SLURM_NODEID. A task that dies makes
    its agent exit non-zero (torchrun restarts nothing) and srun (--kill-on-bad-exit, NeMo-Run's
    default) ends the other nodes' agents, so the job FAILS instead of waiting on a collective."""
    host = host or _env("NEMO_OPTIM_SLURM_HOST")
    if host:
        tunnel = run.Config(run.SSHTunnel, host=host,
                            user=user or _env("NEMO_OPTIM_SLURM_USER", os.environ.get("USER", "")),
                            job_dir=job_dir or _env("NEMO_OPTIM_SLURM_JOB_DIR", "nemo_optim_jobs"))
    else:
        tunnel = run.Config(run.LocalTunnel, job_dir=job_dir or _env("NEMO_OPTIM_SLURM_JOB_DIR", ""))
    packager_name = packager or _env("NEMO_OPTIM_SLURM_PACKAGER", "git" if host else "none")
    if packager_name not in ("git", "none"):
        raise ValueError(f"slurm packager={packager_name!r}: use git (ships the committed code) or none "
                         f"(shared filesystem).")
    mounts = container_mounts if container_mounts is not None else _env("NEMO_OPTIM_SLURM_CONTAINER_MOUNTS", "")
    tasks = ntasks_per_node or _env_int("NEMO_OPTIM_SLURM_NTASKS_PER_NODE", 1)
    node_count = nodes or _env_int("NEMO_OPTIM_SLURM_NODES", 1)
    return run.Config(
        run.SlurmExecutor,
        account=account or _env("NEMO_OPTIM_SLURM_ACCOUNT", "default"),
        partition=partition or _env("NEMO_OPTIM_SLURM_PARTITION"),
        nodes=node_count,
        ntasks_per_node=tasks,
        gpus_per_node=gpus_per_node or _env_int("NEMO_OPTIM_SLURM_GPUS_PER_NODE", None),
        time=time or _env("NEMO_OPTIM_SLURM_TIME", "01:00:00"),
        container_image=container_image or _env("NEMO_OPTIM_SLURM_CONTAINER_IMAGE"),
        container_mounts=[m for m in mounts.split(",") if m],
        tunnel=tunnel,
        packager=run.Config(run.GitArchivePackager) if packager_name == "git" else run.Config(run.Packager),
        # without torchrun, the nodes' tasks would each run the stage alone (no process group)
        launcher="torchrun" if tasks > 1 or node_count > 1 else None,
        env_vars={} if gpus_per_node else cpu_job_env(**({"OMP_NUM_THREADS": "1"} if tasks > 1 else {})),
    )


@run.cli.factory
def kubeflow(
    image: Optional[str] = None,
    namespace: Optional[str] = None,
    num_nodes: Optional[int] = None,
    gpus_per_node: Optional[int] = None,
    cpu: Optional[str] = None,
    memory: Optional[str] = None,
    pvc: Optional[str] = None,
    pvc_path: Optional[str] = None,
) -> run.Config[run.Executor]:
    """A Kubeflow Trainer TrainJob (NeMo-Run's KubeflowExecutor); `pvc` is mounted at
    `pvc_path` for checkpoints and outputs. Needs a kubeconfig (or in-cluster credentials)."""
    from nemo_run.core.execution.kubeflow import KubeflowExecutor

    claim = pvc or _env("NEMO_OPTIM_K8S_PVC")
    mount_path = pvc_path or _env("NEMO_OPTIM_K8S_PVC_PATH", "/results")
    cpu = cpu or _env("NEMO_OPTIM_K8S_CPU")
    memory = memory or _env("NEMO_OPTIM_K8S_MEMORY")
    return run.Config(
        KubeflowExecutor,
        image=image or _env("NEMO_OPTIM_K8S_IMAGE", "nvcr.io/nvidia/nemo:25.11"),
        namespace=namespace or _env("NEMO_OPTIM_K8S_NAMESPACE", "default"),
        # an explicit 0 (or -1) is kept, for the pre-launch check to refuse, not replaced by the default
        num_nodes=num_nodes if num_nodes is not None else _env_int("NEMO_OPTIM_K8S_NUM_NODES", 1),
        gpus_per_node=gpus_per_node if gpus_per_node is not None else _env_int("NEMO_OPTIM_K8S_GPUS_PER_NODE", None),
        cpu_requests=cpu, cpu_limits=cpu, memory_requests=memory, memory_limits=memory,
        volumes=[{"name": "results", "persistentVolumeClaim": {"claimName": claim}}] if claim else [],
        volume_mounts=[{"name": "results", "mountPath": mount_path}] if claim else [],
        env_vars={"NEMO_OPTIM_CACHE": f"{mount_path}/.cache"} if claim else {},
        # the serialized task and a launch.sh travel to the pods through the claim
        workdir_pvc=claim, workdir_pvc_path=f"{mount_path}/nemo_run" if claim else "/nemo_run",
    )


@run.cli.factory
def skypilot(cloud: Optional[str] = None, gpus: Optional[str] = None, num_nodes: int = 1) -> run.Config[run.Executor]:
    """Pass-through to NeMo-Run's SkypilotExecutor (needs `pip install nemo_run[skypilot]`)."""
    return run.Config(run.SkypilotExecutor,cloud=cloud or _env("NEMO_OPTIM_SKYPILOT_CLOUD"),
                                gpus=gpus or _env("NEMO_OPTIM_SKYPILOT_GPUS"), num_nodes=num_nodes)


@run.cli.factory
def dgxcloud(base_url: Optional[str] = None, kube_apiserver_url: Optional[str] = None, client_id: Optional[str] = None,
             client_secret: Optional[str] = None, project_name: Optional[str] = None,
             container_image: Optional[str] = None, pvc_nemo_run_dir: Optional[str] = None, nodes: int = 1,
             gpus_per_node: int = 8) -> run.Config[run.Executor]:
    """Pass-through to NeMo-Run's DGXCloudExecutor (settings from NEMO_OPTIM_DGXC_*)."""
    return run.Config(
        run.DGXCloudExecutor,
        base_url=base_url or _env("NEMO_OPTIM_DGXC_BASE_URL", ""),
        kube_apiserver_url=kube_apiserver_url or _env("NEMO_OPTIM_DGXC_KUBE_APISERVER_URL", ""),
        client_id=client_id or _env("NEMO_OPTIM_DGXC_CLIENT_ID", ""),
        client_secret=client_secret or _env("NEMO_OPTIM_DGXC_CLIENT_SECRET", ""),
        project_name=project_name or _env("NEMO_OPTIM_DGXC_PROJECT", ""),
        container_image=container_image or _env("NEMO_OPTIM_DGXC_IMAGE", "nvcr.io/nvidia/nemo:25.11"),
        pvc_nemo_run_dir=pvc_nemo_run_dir or _env("NEMO_OPTIM_DGXC_PVC_NEMO_RUN_DIR", "/workspace/nemo_run"),
        nodes=nodes, gpus_per_node=gpus_per_node, nprocs_per_node=gpus_per_node,
    )


@run.cli.factory
def lepton(resource_shape: Optional[str] = None, node_group: Optional[str] = None,
           container_image: Optional[str] = None, nemo_run_dir: Optional[str] = None, nodes: int = 1,
           gpus_per_node: int = 8) -> run.Config[run.Executor]:
    """Pass-through to NeMo-Run's LeptonExecutor (workspace from NEMO_OPTIM_LEPTON_*)."""
    return run.Config(
        run.LeptonExecutor,
        resource_shape=resource_shape or _env("NEMO_OPTIM_LEPTON_RESOURCE_SHAPE", ""),
        node_group=node_group or _env("NEMO_OPTIM_LEPTON_NODE_GROUP", ""),
        container_image=container_image or _env("NEMO_OPTIM_LEPTON_IMAGE", "nvcr.io/nvidia/nemo:25.11"),
        nemo_run_dir=nemo_run_dir or _env("NEMO_OPTIM_LEPTON_NEMO_RUN_DIR", "/workspace/nemo_run"),
        nodes=nodes, gpus_per_node=gpus_per_node, nprocs_per_node=gpus_per_node,
    )


EXECUTORS = {"local": local, "torchrun": torchrun, "slurm": slurm, "kubeflow": kubeflow,
             "skypilot": skypilot, "dgxcloud": dgxcloud, "lepton": lepton}
