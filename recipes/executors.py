"""Executor factories. `launch.py --executor NAME` and `nemo llm ... executor=NAME` use them."""


import nemo_run as run


@run.cli.factory
@run.autoconvert
def local() -> run.LocalExecutor:
    """One process on this machine."""
    return run.LocalExecutor(ntasks_per_node=1)


@run.cli.factory
@run.autoconvert
def torchrun(ntasks_per_node: int = 2) -> run.LocalExecutor:
    """`ntasks_per_node` processes on this machine through torchrun (gloo on CPU)."""
    return run.LocalExecutor(ntasks_per_node=ntasks_per_node, launcher="torchrun", env_vars={"OMP_NUM_THREADS": "1"})


EXECUTORS = {"local": local, "torchrun": torchrun}
