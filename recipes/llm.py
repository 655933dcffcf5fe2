"""The `llm` namespace of nemo_run's `nemo` command (registered in pyproject.toml under the
`nemo_run.cli` entry-point group):

    nemo llm import_ckpt --factory smollm2_135m_import_cpu --yes
    nemo llm evaluate model_path=outputs/smollm2_135m/native run.executor=local --yes
    nemo llm ptq --factory smollm2_135m_ptq_fp8_cpu quantization_config.calibration_dataset_size=16 --yes
    nemo llm finetune --factory smollm2_135m_finetune_teacher_cpu training.max_steps=10 --yes
    nemo llm distill --factory smollm2_135m_distill_depth20_cpu training.max_steps=10 --yes
    nemo llm speculative --factory smollm2_135m_speculative_eagle3_cpu training.max_steps=10 --yes

Importing this module registers the stage entry points and every recipe factory. The commands
run `launching.CheckedRunContext`: launch.py's pre-launch checks and one-line errors, and the
`local` executor when no `run.executor=` is given (as launch.py; `--direct` runs in this process).
"""


import nemo_run as run

from nemo_optim.stages.convert import export_ckpt, import_ckpt
from nemo_optim.stages.distill import distill
from nemo_optim.stages.evaluate import evaluate
from nemo_optim.stages.finetune import finetune
from nemo_optim.stages.prune import prune
from nemo_optim.stages.ptq import ptq
from nemo_optim.stages.speculative import speculative
from nemo_optim_recipes import convert, distill as distill_recipes, executors, finetune as finetune_recipes  # noqa: F401
from nemo_optim_recipes import prune as prune_recipes, ptq as ptq_recipes, speculative as speculative_recipes  # noqa: F401
from nemo_optim_recipes.launching import CheckedRunContext
# (imported to register their factories)

STAGES = (import_ckpt, export_ckpt, evaluate, ptq, prune, finetune, distill, speculative)

for _stage in STAGES:
    if not hasattr(_stage, "cli_entrypoint"):
        run.cli.entrypoint(namespace="llm", run_ctx_cls=CheckedRunContext, default_executor=executors.local())(_stage)

# NeMo-Run's factory registry is the one list of recipes (a factory is named after its function);
# launch.py and the tests read it from there, as `nemo llm STAGE --factory NAME` does.
RECIPES = {factory.__name__: factory for stage in STAGES
           for factory in run.cli.list_factories(f"{stage.__module__}.{stage.__qualname__}")}
