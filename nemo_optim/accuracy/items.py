"""Multiple-choice items: read from a user's JSONL / CSV file, or built from text the machine has.

Accepted file shapes (one item per JSONL line or CSV row):
  - MMLU: `question`, the choices as `choices` (a list) or columns `A`, `B`, `C`, `D`, `answer`
    (an index or a letter), optional `subject`; MMLU's own header-less CSV
    (question, A, B, C, D, answer letter) is read too, the subject taken from the file name.
  - lm-eval's multiple-choice shape: `query` (or `context` / `ctx`), `choices`, `gold` (or
    `label`); ARC's `{"text": [...], "label": [...]}` choices with `answerKey` also work.

The embedded task (`embedded:stdlib-cloze`) needs no download: each item is the start of a
held-out document of the embedded corpus (the validation split of Python's help topics and
standard-library docstrings, never trained on) and four candidate next sentences, the true one
and three taken from other documents, picked to be about as long as the true one. It is a
next-sentence cloze over Python documentation; it is not MMLU and says nothing about world
knowledge, but it ranks models of one family the way a task accuracy does.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import re
from pathlib import Path
from typing import Literal

from nemo_optim.data.corpus import jsonl_objects
from nemo_optim.errors import InputError

PromptStyle = Literal["letters", "cloze"]
EMBEDDED_TASKS = ("embedded:stdlib-cloze",)
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class TaskDataError(InputError):
    """An items file that cannot be used, naming the file, the row and the field."""


@dataclasses.dataclass(frozen=True)
class MultipleChoiceItem:
    question: str
    """The context: an MMLU question, or the text a cloze choice continues."""
    choices: tuple[str, ...]
    answer: int
    """Index of the correct choice."""
    subject: str = ""
    style: PromptStyle = "cloze"
    """`letters`: MMLU's prompt (choices listed, the model scores " A" / " B" ...);
    `cloze`: the model scores each choice's text as the continuation of `question`."""


def _fail(path: Path, row: int, message: str) -> TaskDataError:
    return TaskDataError(f"{path}: row {row}: {message}")


def _answer_index(value, choices: tuple[str, ...], labels: list[str] | None, path: Path, row: int, field: str) -> int:
    if isinstance(value, bool) or value is None or value == "":
        raise _fail(path, row, f"field {field!r} is missing; give the correct choice as an index or a letter.")
    if labels is not None and str(value) in labels:
        index = labels.index(str(value))
    elif isinstance(value, int) or (isinstance(value, str) and value.strip().lstrip("-").isdigit()):
        index = int(value)
    elif isinstance(value, str) and len(value.strip()) == 1 and value.strip().upper() in LETTERS:
        index = LETTERS.index(value.strip().upper())
    else:
        raise _fail(path, row, f"field {field!r}={value!r} is neither a choice index nor a letter.")
    if not 0 <= index < len(choices):
        raise _fail(path, row, f"field {field!r}={value!r} is out of range for {len(choices)} choices.")
    return index


def _item_from_record(record: dict, path: Path, row: int, default_subject: str) -> MultipleChoiceItem:
    question_field = next((f for f in ("question", "query", "context", "ctx") if f in record), None)
    if question_field is None or not isinstance(record[question_field], str):
        raise _fail(path, row, "no string field 'question' (or 'query' / 'context' / 'ctx').")
    labels = None
    if "choices" in record:
        raw, choices_field = record["choices"], "choices"
        if isinstance(raw, dict) and "text" in raw:  # ARC: {"text": [...], "label": ["A", ...]}
            labels = [str(label) for label in raw.get("label", [])] or None
            raw = raw["text"]
    elif all(letter in record for letter in "ABCD"):
        raw, choices_field = [record[letter] for letter in LETTERS if letter in record], "A..D"
    else:
        raise _fail(path, row, "no field 'choices' (a list) and no columns 'A', 'B', 'C', 'D'.")
    if not isinstance(raw, list) or len(raw) < 2 or not all(isinstance(c, str) and c.strip() for c in raw):
        raise _fail(path, row, f"field {choices_field!r} must hold at least two non-empty strings, got {raw!r}.")
    choices = tuple(raw)
    answer_field = next((f for f in ("answer", "gold", "label", "answerKey") if f in record), "answer")
    answer = _answer_index(record.get(answer_field), choices, labels, path, row, answer_field)
    mmlu_shaped = question_field == "question"
    return MultipleChoiceItem(
        question=record[question_field], choices=choices, answer=answer,
        subject=str(record.get("subject") or default_subject), style="letters" if mmlu_shaped else "cloze",
    )


def _mmlu_subject(path: Path) -> str:
    # MMLU's files are named e.g. `abstract_algebra_test.csv`
    return re.sub(r"_(test|dev|val)$", "", path.stem).replace("_", " ")


def _records(path: Path) -> list[tuple[int, dict]]:
    if path.suffix == ".jsonl":
        return list(jsonl_objects(path, error_at=_fail))
    if path.suffix == ".csv":
        rows = list(csv.reader(path.read_text(encoding="utf-8").splitlines()))
        if rows and rows[0] and rows[0][0].strip().lower() in ("question", "query"):
            header = [name.strip() for name in rows[0]]
            return [(row, dict(zip(header, values))) for row, values in enumerate(rows[1:], start=2) if values]
        records = []  # MMLU's own files: question, A, B, C, D, answer - no header
        for row, values in enumerate(rows, start=1):
            if not values:
                continue
            if len(values) < 4:
                raise _fail(path, row, f"{len(values)} columns; MMLU rows are question, choices..., answer.")
            records.append((row, {"question": values[0], "choices": values[1:-1], "answer": values[-1]}))
        return records
    raise TaskDataError(f"{path}: unknown file type {path.suffix!r}; give a .jsonl or .csv items file.")


def read_items(path: str | Path) -> list[MultipleChoiceItem]:
    """Every item of a JSONL / CSV file, in file order; one error naming file, row and field."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise TaskDataError(
            f"task={str(path)!r}: file not found; give a .jsonl or .csv items file or one of "
            f"{', '.join(EMBEDDED_TASKS)}."
        )
    items = [_item_from_record(record, path, row, _mmlu_subject(path)) for row, record in _records(path)]
    if not items:
        raise TaskDataError(f"{path}: holds no items.")
    return items


# --- the embedded cloze task -------------------------------------------------------------------

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def _is_prose(sentence: str) -> bool:
    letters = sum(ch.isalpha() or ch in " ,.'-" for ch in sentence)
    return 30 <= len(sentence) <= 300 and sentence.endswith(".") and letters >= 0.9 * len(sentence)


def _cloze_parts(document: str) -> list[tuple[str, str]]:
    """(context, the next sentence) pairs of a document: every prose sentence preceded by
    120-600 characters of whole sentences, at most one pair per 2 sentences."""
    sentences = _SENTENCE_END.split(" ".join(document.split()))
    pairs, next_allowed = [], 1
    for index in range(1, len(sentences)):
        if index < next_allowed or not _is_prose(sentences[index]):
            continue
        context = ""
        for sentence in reversed(sentences[:index]):
            if len(context) + len(sentence) > 600:
                break
            context = f"{sentence} {context}".strip()
        if len(context) >= 120:
            pairs.append((context, sentences[index]))
            next_allowed = index + 2
    return pairs


def embedded_cloze_items() -> list[MultipleChoiceItem]:
    """The `embedded:stdlib-cloze` items, the same on every machine with one Python version."""
    from nemo_optim.data.corpus import DataConfig, split_documents

    config = DataConfig(source="embedded")
    pairs = [pair for doc in split_documents(config, "validation") for pair in _cloze_parts(doc)]
    # a few texts recur across documents (inherited docstrings): drop pairs whose sentence or
    # context also appears in text a stage may train or calibrate on
    seen = "\n".join(" ".join(doc.split())
                     for split in ("train", "calibration") for doc in split_documents(config, split))
    pairs = [(context, truth) for context, truth in pairs if context not in seen and truth not in seen]
    pairs = sorted(set(pairs), key=lambda pair: _digest(pair[0]))
    items = []
    for context, truth in pairs:
        others = [other for _, other in pairs if other != truth]
        # distractors of about the true sentence's length, so length alone does not give it away
        distractors = sorted(others, key=lambda other: (abs(len(other) - len(truth)), _digest(other + context)))[:3]
        answer = _digest(context) % 4
        choices = distractors[:answer] + [truth] + distractors[answer:]
        items.append(MultipleChoiceItem(question=context, choices=tuple(choices), answer=answer,
                                        subject="python documentation", style="cloze"))
    return items


def load_task_items(task: str) -> list[MultipleChoiceItem]:
    if task == "embedded:stdlib-cloze":
        return embedded_cloze_items()
    if task.startswith("embedded:"):
        raise TaskDataError(f"task={task!r}: embedded tasks are {', '.join(EMBEDDED_TASKS)}.")
    return read_items(task)
