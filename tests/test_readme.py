"""The README stays a short user guide that is true: its recipes, overrides, executors, paths, Python
names, make targets and test commands exist, CI runs the test commands it documents, and measured
numbers live in benchmarks/results/ rather than in it."""

from __future__ import annotations

import importlib
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
MAX_LINES = 300


def _code_blocks(text: str) -> list[str]:
    return re.findall(r"^```[a-z]*\n(.*?)^```", text, flags=re.S | re.M)


def _commands(text: str) -> list[list[str]]:
    """Every command line of the README's code blocks (continuations joined, comments dropped) as tokens."""
    commands = []
    for block in _code_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            if tokens:
                commands.append(tokens)
    return commands


def _inline_code(text: str) -> list[str]:
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return re.findall(r"`([^`\n]+)`", prose)


def _tracked_top_level() -> set[str]:
    return {path.name for path in REPO.iterdir() if not path.name.startswith(".") or path.name == ".ci"} - {
        "outputs", "build", "__pycache__"}


@pytest.fixture(scope="module")
def registry():
    from nemo_optim_recipes.launching import all_executors, all_recipes

    return all_recipes(), all_executors()


def _launches(commands: list[list[str]]) -> list[tuple[str | None, str, list[str]]]:
    """(stage or None for launch.py, recipe, the remaining arguments) of every launch.py / nemo llm command."""
    found = []
    for tokens in commands:
        if any(token.endswith("launch.py") for token in tokens):
            rest = tokens[[i for i, token in enumerate(tokens) if token.endswith("launch.py")][0] + 1:]
            if rest and not rest[0].startswith("-"):
                found.append((None, rest[0], rest[1:]))
        elif "--factory" in tokens:
            at = tokens.index("--factory")
            stage = tokens[tokens.index("llm") + 1] if "llm" in tokens else None
            found.append((stage, tokens[at + 1], tokens[at + 2:]))
    return found


def test_the_readme_is_a_short_guide():
    lines = README.count("\n")
    assert lines <= MAX_LINES, f"README.md has {lines} lines (at most {MAX_LINES}): move detail to benchmarks/results/"


def test_inline_code_stays_on_one_line():
    """(What the other tests read from inline code relies on it.)"""
    prose = re.sub(r"^```.*?^```", "", README, flags=re.S | re.M)
    split = [line for line in prose.splitlines() if line.count("`") % 2]
    assert not split, "inline code spans that cross a line break:\n" + "\n".join(split)


def test_the_readme_states_no_measured_numbers():
    """Times, memory, percentages and speed ratios belong in benchmarks/results/ (one place per number)."""
    measured = re.compile(r"(?<![\w.])(~ ?)?\d+(\.\d+)? ?(%|ms|s|min|minutes|seconds|h|hours?|GiB|MiB|GB|MB)(?!\w)"
                          r"|(?<![\w.])\d+(\.\d+)?x(?!\w)")
    found = [line for line in README.splitlines() if measured.search(line.replace("k8s", ""))]
    assert not found, "measured numbers in README.md (link benchmarks/results/ instead):\n" + "\n".join(found)


def test_every_recipe_the_readme_launches_exists_and_takes_its_overrides(registry):
    import fiddle as fdl

    from nemo_optim_recipes.launching import apply_overrides, executor_with_overrides, split_executor

    recipes, executors = registry
    launches = _launches(_commands(README))
    assert len(launches) > 20, launches
    for stage, name, arguments in launches:
        assert name in recipes, f"README launches {name!r}, which is not a recipe ({', '.join(sorted(recipes))})"
        partial = recipes[name]()
        if stage is not None:
            assert partial.__fn_or_cls__.__name__ == stage, f"`nemo llm {stage} --factory {name}`: a {stage} recipe?"
        executor, overrides = split_executor([item for item in arguments if "=" in item and not item.startswith("-")])
        assert executor is None or executor in executors, f"{name}: run.executor={executor} is not an executor"
        fields = [item[len("executor."):] for item in overrides if item.startswith("executor.")]
        fdl.build(apply_overrides(partial, [item for item in overrides if not item.startswith("executor.")]))
        executor_with_overrides(executors[executor or "local"], fields)


def test_every_recipe_and_executor_the_readme_names_exists(registry):
    recipes, executors = registry
    named = {token for token in _inline_code(README) if re.fullmatch(r"\w+_(recipe|cpu|bf16)", token)}
    named |= {name for _, name, _ in _launches([shlex.split(code) for code in _inline_code(README)
                                                 if "--factory" in code or "launch.py" in code])}
    named -= {"RECIPE"}
    assert named and not named - set(recipes), f"not recipes: {sorted(named - set(recipes))}"

    table = re.search(r"^\| `run\.executor=` .*?(?=^\s*$)", README, flags=re.S | re.M).group(0)
    listed = {re.match(r"\| `(\w+)`", row).group(1) for row in table.splitlines()[2:]}
    assert listed == set(executors), f"the executor table lists {sorted(listed)}, the registry {sorted(executors)}"
    kubeflow = [row for row in table.splitlines() if row.startswith("| `kubeflow`")][0]
    assert "recipes/kubernetes.py" in kubeflow and "No API server runs here" in kubeflow  # what is and isn't checked


def test_every_repository_path_the_readme_mentions_exists():
    top = _tracked_top_level()
    candidates = set(_inline_code(README)) | set(re.findall(r"\]\(([^)#\s]+)", README))
    for tokens in _commands(README):
        candidates |= set(tokens)
    checked = []
    for candidate in candidates:
        path = candidate.strip().rstrip(".,;:")
        if not re.fullmatch(r"[\w.\-/]+", path) or path.startswith(("http", "/")):
            continue
        if path.split("/")[0] not in top or ("/" not in path and not Path(path).suffix):
            continue
        checked.append(path)
        assert (REPO / path).exists(), f"README.md mentions {path}, which is not in the repository"
    assert len(checked) > 15, checked


def _slug(heading: str) -> str:
    """GitHub's anchor for a markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_into_a_results_page_finds_its_section():
    links = re.findall(r"\]\(([^)\s]+\.md)#([^)\s]+)\)", README)
    assert links
    for page, anchor in links:
        headings = re.findall(r"^#+ (.+)$", (REPO / page).read_text(), flags=re.M)
        assert anchor in {_slug(heading) for heading in headings}, f"{page} has no section #{anchor}"


def test_every_module_and_python_name_the_readme_mentions_exists():
    modules = {tokens[tokens.index("-m") + 1] for tokens in _commands(README) if "-m" in tokens}
    modules |= {code.split()[2] for code in _inline_code(README) if code.startswith("python -m ")}
    for module in modules:
        assert (REPO / (module.replace(".", "/") + ".py")).is_file(), f"python -m {module}: no such module here"
    for dotted in {code for code in _inline_code(README) if re.fullmatch(r"nemo_optim(\.\w+)+", code)}:
        parts = dotted.split(".")
        for cut in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            for attribute in parts[cut:]:
                assert hasattr(obj, attribute), f"README.md names {dotted}: {attribute!r} is not there"
                obj = getattr(obj, attribute)
            break
        else:
            pytest.fail(f"README.md names {dotted}, which does not import")


def _readme_make_commands() -> set[str]:
    return {" ".join(tokens) for tokens in _commands(README) if tokens[0] == "make"}


def test_every_make_target_the_readme_uses_exists():
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, flags=re.M))
    used = {command.split()[1] for command in _readme_make_commands()}
    used |= {code.split()[1] for code in _inline_code(README) if re.fullmatch(r"make [\w-]+", code)}
    assert used and not used - targets, f"make targets the Makefile lacks: {sorted(used - targets)}"


def test_ci_runs_the_test_commands_the_readme_documents():
    """.ci/run calls `make ...` steps; each is a command line of the README's code blocks, verbatim, and
    the README's test commands other than the slow suite are what CI runs."""
    ci = (REPO / ".ci" / "run").read_text()
    steps = {" ".join(line.split()[1:]) for line in ci.splitlines() if line.startswith("step ")}
    assert steps and all(step.startswith("make ") for step in steps), steps
    documented = _readme_make_commands()
    assert not steps - documented, f".ci/run calls commands the README does not document: {sorted(steps - documented)}"
    tests = {command for command in documented if command.split()[1] in ("lint", "test") or "test-" in command}
    assert tests - steps == {"make test-slow"}, f"README test commands CI does not run: {sorted(tests - steps)}"
    assert "`.ci/run`" in README
