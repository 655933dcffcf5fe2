"""The `llm` namespace of nemo_run's `nemo` command (registered in pyproject.toml under the
`nemo_run.cli` entry-point group):

    nemo llm import_ckpt --factory smollm2_135m_import_cpu --yes
    nemo llm evaluate model_path=outputs/smollm2_135m/native executor=local --yes
    nemo llm ptq --factory smollm2_135m_ptq_fp8_cpu quantization_config.calibration_dataset_size=16 --yes
    nemo llm finetune --factory smollm2_135m_finetune_teacher_cpu training.max_steps=10 --yes
    nemo llm distill --factory smollm2_135m_distill_depth20_cpu training.max_steps=10 --yes
    nemo llm speculative --factory smollm2_135m_speculative_eagle3_cpu training.max_steps=10 --yes

Importing this module registers the stage entry points and every recipe factory.
"""


import nemo_run as run

from nemo_optim.convert import export_ckpt, import_ckpt
from nemo_optim.distillation.distill import distill
from nemo_optim.evaluation import evaluate
from nemo_optim.finetune import finetune
from nemo_optim.pruning.prune import prune
from nemo_optim.quantization.ptq import ptq
from nemo_optim.speculative.speculative import speculative
from recipes import convert, executors  # noqa: F401  (registers factories)
from recipes import distill as distill_recipes
from recipes import finetune as finetune_recipes
from recipes import prune as prune_recipes
from recipes import ptq as ptq_recipes
from recipes import speculative as speculative_recipes

for _stage in (import_ckpt, export_ckpt, evaluate, ptq, prune, finetune, distill, speculative):
    if not hasattr(_stage, "cli_entrypoint"):
        run.cli.entrypoint(namespace="llm")(_stage)

RECIPES = {**convert.RECIPES, **ptq_recipes.RECIPES, **prune_recipes.RECIPES,
           **finetune_recipes.RECIPES, **distill_recipes.RECIPES, **speculative_recipes.RECIPES}
