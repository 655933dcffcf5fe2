"""Multiple-choice accuracy (Megatron-LM's `mmlu.py` / lm-eval's `multiple_choice` tasks):
each choice is scored by the log-likelihood the model gives it after the prompt; `accuracy`
picks the highest sum, `accuracy_norm` the highest sum per character of the choice (lm-eval's
`acc` / `acc_norm`).

    python -c "from nemo_optim.accuracy.multiple_choice import *; ..."   # or the evaluate stage:
    .venv/bin/python launch.py evaluate_recipe model_path=smollm2-135m-instruct reference_model_path=None
"""

# No `from __future__ import annotations`: NeMo-Run's CLI parser reads AccuracyConfig's annotations.

import dataclasses
import math
from collections import defaultdict
from typing import Optional

import torch

from nemo_optim.accuracy.items import LETTERS, MultipleChoiceItem, TaskDataError, load_task_items, read_items
from nemo_optim.accuracy.scoring import encode_pair, score_continuations
from nemo_optim.errors import InputError


@dataclasses.dataclass
class AccuracyConfig:
    """Which multiple-choice task a model is scored on, and how."""

    task: str = "embedded:stdlib-cloze"
    """`embedded:stdlib-cloze` (built from held-out Python documentation, no download), or a
    .jsonl / .csv items file in MMLU's or lm-eval's multiple-choice shape."""
    num_items: Optional[int] = None
    """Score the first N items (after the few-shot examples); None scores all."""
    num_fewshot: int = 0
    """Solved examples put before each question: taken from `fewshot_path` if given, else the
    first `num_fewshot` items of the same subject, which are then not scored."""
    fewshot_path: Optional[str] = None
    micro_batch_size: int = 8
    """Sequences (item x choice) per forward pass."""
    max_length: Optional[int] = None
    """Longest scored sequence in tokens (longer prompts lose their start); None: the model's
    `max_position_embeddings`."""

    def __post_init__(self) -> None:
        errors = []
        if self.num_items is not None and self.num_items < 1:
            errors.append(f"num_items={self.num_items} must be at least 1 (or None for all)")
        if self.num_fewshot < 0:
            errors.append(f"num_fewshot={self.num_fewshot} must be 0 or more")
        if self.micro_batch_size < 1:
            errors.append(f"micro_batch_size={self.micro_batch_size} must be at least 1")
        if self.max_length is not None and self.max_length < 2:
            errors.append(f"max_length={self.max_length} must be at least 2")
        if errors:
            raise InputError("AccuracyConfig: " + "; ".join(errors) + ".")


@dataclasses.dataclass
class AccuracyResult:
    task: str
    items: int
    accuracy: float
    accuracy_norm: float
    stderr: float
    """Standard error of `accuracy` (sample standard deviation / sqrt(items), as lm-eval)."""
    stderr_norm: float
    ci95: tuple[float, float]
    """95% Wilson interval of `accuracy`: with few items it is wide, read it before a difference."""
    ci95_norm: tuple[float, float]
    num_fewshot: int
    seconds: float
    per_subject: dict = dataclasses.field(default_factory=dict)
    """subject -> {"items", "accuracy", "accuracy_norm"} (files with several subjects)."""
    predictions: list = dataclasses.field(default_factory=list)
    """Per item, the index of the choice picked by summed log-likelihood (paired comparisons)."""
    predictions_norm: list = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _example_text(item: MultipleChoiceItem) -> str:
    """The prompt of one item, without its answer."""
    if item.style == "letters":
        listed = "".join(f"\n{LETTERS[i]}. {choice}" for i, choice in enumerate(item.choices))
        return f"{item.question.strip()}{listed}\nAnswer:"
    return item.question


def _choice_texts(item: MultipleChoiceItem) -> list[str]:
    return list(LETTERS[: len(item.choices)]) if item.style == "letters" else list(item.choices)


def build_prompt(item: MultipleChoiceItem, examples: list[MultipleChoiceItem]) -> str:
    """lm-eval's layout: [description] examples and question separated by a blank line, the
    answer after one space (MMLU's description names the subject)."""
    description = (f"The following are multiple choice questions (with answers) about {item.subject}.\n\n"
                   if item.style == "letters" and item.subject else "")
    shots = "".join(f"{_example_text(e)} {_choice_texts(e)[e.answer]}\n\n" for e in examples)
    return description + shots + _example_text(item)


def _split_fewshot(items: list[MultipleChoiceItem], config: AccuracyConfig):
    """(items to score, subject -> few-shot examples)."""
    if config.num_fewshot == 0:
        return items, defaultdict(list)
    pool = read_items(config.fewshot_path) if config.fewshot_path else items
    examples = defaultdict(list)
    for item in pool:
        if len(examples[item.subject]) < config.num_fewshot:
            examples[item.subject].append(item)
    used = {id(e) for shots in examples.values() for e in shots}
    scored = items if config.fewshot_path else [item for item in items if id(item) not in used]
    # from the task itself, a subject needs its examples and at least one item left to score
    needed = config.num_fewshot + (0 if config.fewshot_path else 1)
    counts = defaultdict(int)
    for item in pool:
        counts[item.subject] += 1
    short = sorted(s for s in {i.subject for i in items} if counts[s] < needed)
    if short:
        raise TaskDataError(
            f"num_fewshot={config.num_fewshot}: subject {short[0]!r} has {counts[short[0]]} items in "
            f"{config.fewshot_path or config.task}, {needed} needed; lower num_fewshot or give fewshot_path."
        )
    return scored, examples


def _stderr(correct: list[bool]) -> float:
    n = len(correct)
    if n < 2:
        return float("nan")
    p = sum(correct) / n
    return math.sqrt(p * (1 - p) * n / (n - 1) / n)


def _wilson(correct: list[bool], z: float = 1.96) -> tuple[float, float]:
    n, p = len(correct), sum(correct) / len(correct)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def task_items(config: AccuracyConfig) -> tuple[list[MultipleChoiceItem], dict]:
    """The items to score and their few-shot examples (checks the task before any model loads)."""
    items, examples = _split_fewshot(load_task_items(config.task), config)
    if config.num_items is not None:
        if len(items) < config.num_items:
            raise TaskDataError(f"num_items={config.num_items}: {config.task} has {len(items)} items to score; "
                                f"lower num_items.")
        items = items[: config.num_items]
    return items, examples


def choice_log_likelihoods(
    model: torch.nn.Module,
    tokenizer,
    items: list[MultipleChoiceItem],
    examples: dict,
    *,
    max_length: int,
    micro_batch_size: int = 8,
) -> tuple[list[list[float]], float]:
    """Per item, the log-likelihood of each choice after its prompt; and forward seconds."""
    pairs, owners = [], []
    for index, item in enumerate(items):
        prompt = build_prompt(item, examples[item.subject])
        for choice in _choice_texts(item):
            pairs.append(encode_pair(tokenizer, prompt, " " + choice))
            owners.append(index)
    scores, seconds = score_continuations(model, pairs, max_length=max_length, micro_batch_size=micro_batch_size,
                                          pad_id=tokenizer.eos_token_id or 0, description="multiple choice")
    per_item: list[list[float]] = [[] for _ in items]
    for owner, (log_prob, _) in zip(owners, scores):
        per_item[owner].append(log_prob)
    return per_item, seconds


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # ties -> first, as numpy


def evaluate_multiple_choice(model: torch.nn.Module, tokenizer, config: AccuracyConfig,
                             max_length: int) -> AccuracyResult:
    """Accuracy of `model` on `config.task` (every rank calls it; all get the result)."""
    items, examples = task_items(config)
    log_likelihoods, seconds = choice_log_likelihoods(
        model, tokenizer, items, examples, max_length=config.max_length or max_length,
        micro_batch_size=config.micro_batch_size,
    )
    correct, correct_norm, subjects = [], [], defaultdict(lambda: ([], []))
    predictions, predictions_norm = [], []
    for item, scores in zip(items, log_likelihoods):
        lengths = [float(len(choice)) for choice in _choice_texts(item)]
        predictions.append(_argmax(scores))
        predictions_norm.append(_argmax([s / n for s, n in zip(scores, lengths)]))
        hit, hit_norm = predictions[-1] == item.answer, predictions_norm[-1] == item.answer
        correct.append(hit)
        correct_norm.append(hit_norm)
        subjects[item.subject][0].append(hit)
        subjects[item.subject][1].append(hit_norm)
    return AccuracyResult(
        task=config.task, items=len(items),
        accuracy=sum(correct) / len(items), accuracy_norm=sum(correct_norm) / len(items),
        stderr=_stderr(correct), stderr_norm=_stderr(correct_norm),
        ci95=_wilson(correct), ci95_norm=_wilson(correct_norm),
        num_fewshot=config.num_fewshot, seconds=seconds,
        per_subject={subject: {"items": len(hits), "accuracy": sum(hits) / len(hits),
                               "accuracy_norm": sum(norm) / len(norm)}
                     for subject, (hits, norm) in sorted(subjects.items())} if len(subjects) > 1 else {},
        predictions=predictions, predictions_norm=predictions_norm,
    )
