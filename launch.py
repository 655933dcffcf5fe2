"""Launch a nemo-optim recipe through NeMo-Run.

    python launch.py smollm2_135m_import_cpu --yes                 # local, one process
    python launch.py smollm2_135m_import_cpu output_path=/tmp/x --dryrun
    python launch.py RECIPE run.executor=torchrun --yes                # 2 processes (torchrun)
    python launch.py RECIPE run.executor=slurm run.executor.account=ACC run.executor.partition=batch --yes

Overrides and the executor use NeMo-Run's syntax, the same as `nemo llm STAGE --factory RECIPE ...`
and the experiments (`--executor NAME` is accepted too).

Exits non-zero, with the log path, when a task fails (NeMo-Run itself exits 0).
"""

from __future__ import annotations

import argparse
import sys

from nemo_optim_recipes.launching import launch_recipe, split_executor


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", help="recipe name (see --list)", nargs="?")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the recipe's fields")
    parser.add_argument("--executor", default=None, help="executor factory name, as run.executor=NAME (default: local)")
    parser.add_argument("--dryrun", action="store_true", help="print what would run, run nothing")
    parser.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    parser.add_argument("--list", action="store_true", help="list recipes and executors")
    args = parser.parse_intermixed_args(argv)
    named, overrides = split_executor(args.overrides)
    return launch_recipe(args.recipe, overrides, executor=named or args.executor or "local", dryrun=args.dryrun,
                         yes=args.yes, list_only=args.list or not args.recipe)


if __name__ == "__main__":
    sys.exit(main())
