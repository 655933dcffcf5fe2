"""Text that needs no download, user text files, and deterministic splits.

Sources (the `source` field of `DataConfig`):
  - `embedded`           both embedded parts below
  - `embedded:pydoc`     Python's help topics (`pydoc_data.topics`: language reference prose)
  - `embedded:docstrings` docstrings of a fixed list of standard-library modules
  - a `.txt` file        documents separated by blank lines
  - a `.jsonl` file      one JSON object a line, text in `text_field`
  - `hf:<name>[:<split>]` a Hugging Face dataset already in the local datasets cache

Every document is assigned to train / validation / calibration by a hash of its text, so the
split is the same on every machine and independent of document order.
"""

# No `from __future__ import annotations`: NeMo-Run's CLI parser reads these config
# dataclasses' annotations as real types (and needs Optional[...] rather than `X | None`).

import dataclasses
import hashlib
import importlib
import inspect
import json
from pathlib import Path
from typing import Literal

from nemo_optim.errors import InputError

Split = Literal["train", "validation", "calibration"]
SPLITS: tuple[Split, ...] = ("train", "validation", "calibration")

EMBEDDED_PARTS = ("pydoc", "docstrings")

# A fixed list, so the docstring corpus is the same on every run of one Python version.
DOCSTRING_MODULES = (
    "abc argparse ast asyncio base64 bisect bz2 calendar cmath codecs collections configparser "
    "contextlib copy csv dataclasses datetime decimal difflib doctest email enum fnmatch "
    "fractions functools gettext glob gzip hashlib heapq html.parser http.client importlib "
    "inspect io ipaddress itertools json locale logging lzma mailbox math numbers operator "
    "optparse os pathlib pdb pickle pkgutil platform pprint queue random re sched secrets "
    "selectors shutil signal smtplib socket sqlite3 ssl statistics string struct subprocess "
    "sysconfig tarfile tempfile textwrap threading timeit tokenize trace traceback types typing "
    "unittest unittest.mock urllib.parse uuid warnings weakref xml.etree.ElementTree zipfile zlib"
).split()


class DataError(InputError):
    """A data source that cannot be read, with what to do instead."""


@dataclasses.dataclass
class DataConfig:
    """Where text comes from and how it is cut into training / evaluation sequences."""

    source: str = "embedded"
    """`embedded`, `embedded:pydoc`, `embedded:docstrings`, a .txt/.jsonl path, or `hf:<name>`."""
    text_field: str = "text"
    """JSONL / HF datasets: the field that holds the text."""
    seq_length: int = 256
    """Tokens per packed sequence."""
    validation_percent: int = 10
    """Share of documents (by hash) held out for validation."""
    calibration_percent: int = 10
    """Share of documents (by hash) reserved for calibration / importance estimation."""

    def __post_init__(self) -> None:
        errors = []
        if self.seq_length < 2:
            errors.append(f"seq_length={self.seq_length} must be at least 2")
        for name in ("validation_percent", "calibration_percent"):
            value = getattr(self, name)
            if not 0 < value < 100:
                errors.append(f"{name}={value} must be between 1 and 99")
        if self.validation_percent + self.calibration_percent >= 100:
            errors.append("validation_percent + calibration_percent must leave documents for training")
        source = self.source
        if source.startswith("embedded:") and source.split(":", 1)[1] not in EMBEDDED_PARTS:
            errors.append(f"source={source!r}: embedded parts are {', '.join(EMBEDDED_PARTS)}")
        if errors:
            raise DataError("DataConfig: " + "; ".join(errors) + ".")


def _chunks(text: str, max_chars: int = 2000) -> list[str]:
    """Cuts a long text at paragraph boundaries into pieces of about `max_chars`, so that
    hash splits of a corpus of few long documents are still fine-grained."""
    pieces, current = [], ""
    for paragraph in text.split("\n\n"):
        if current and len(current) + len(paragraph) > max_chars:
            pieces.append(current.strip())
            current = ""
        current += paragraph + "\n\n"
    if current.strip():
        pieces.append(current.strip())
    return pieces


def _pydoc_documents() -> list[str]:
    from pydoc_data.topics import topics

    return [piece for key in sorted(topics) for piece in _chunks(topics[key])]


def _docstring_documents() -> list[str]:
    documents = []
    for module_name in DOCSTRING_MODULES:
        module = importlib.import_module(module_name)
        if module.__doc__:
            documents.append(inspect.cleandoc(module.__doc__))
        for _, obj in sorted(vars(module).items()):
            if ((inspect.isclass(obj) or inspect.isfunction(obj))
                    and getattr(obj, "__module__", None) == module.__name__):
                doc = inspect.getdoc(obj)
                if doc and len(doc) > 80:
                    documents.append(doc)
    return documents


def _text_file_documents(path: Path) -> list[str]:
    return [block.strip() for block in path.read_text(encoding="utf-8").split("\n\n") if block.strip()]


def jsonl_objects(path: Path, error_at=lambda path, line, message: DataError(f"{path}:{line}: {message}")):
    """(line number, object) for every non-empty line of a JSONL file; `error_at(path, line,
    message)` makes the exception for a line that is not one JSON object."""
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise error_at(path, line_number,
                           f"not valid JSON ({error.msg}); each line must be one JSON object.") from None
        if not isinstance(record, dict):
            raise error_at(path, line_number, "not a JSON object; each line must be one JSON object.")
        yield line_number, record


def _jsonl_documents(path: Path, text_field: str) -> list[str]:
    documents = []
    for line_number, record in jsonl_objects(path):
        if not isinstance(record.get(text_field), str):
            raise DataError(
                f"{path}:{line_number}: no string field {text_field!r}; set text_field to the field holding the text."
            )
        documents.append(record[text_field])
    return documents


def _hf_documents(spec: str, text_field: str) -> list[str]:
    parts = spec.split(":")
    name, split = parts[1], parts[2] if len(parts) > 2 else "train"
    try:
        import datasets  # optional: users who have HF datasets cached locally
    except ImportError:
        raise DataError(f"source={spec!r} needs the `datasets` package: pip install datasets.") from None
    try:
        dataset = datasets.load_dataset(name, split=split, download_mode="reuse_cache_if_exists")
    except Exception as error:  # noqa: BLE001 - datasets raises many types; the message is what matters
        raise DataError(f"source={spec!r}: could not load from the local datasets cache: {error}") from None
    if text_field not in dataset.column_names:
        raise DataError(f"source={spec!r}: no column {text_field!r}; columns: {dataset.column_names}.")
    return [text for text in dataset[text_field] if text]


def load_documents(config: DataConfig) -> list[str]:
    """All documents of `config.source`, in a fixed order."""
    source = config.source
    if source == "embedded":
        return _pydoc_documents() + _docstring_documents()
    if source == "embedded:pydoc":
        return _pydoc_documents()
    if source == "embedded:docstrings":
        return _docstring_documents()
    if source.startswith("hf:"):
        return _hf_documents(source, config.text_field)
    path = Path(source).expanduser()
    if not path.is_file():
        raise DataError(
            f"source={source!r}: file not found; give a .txt or .jsonl file, `embedded`, "
            f"`embedded:pydoc`, `embedded:docstrings`, or `hf:<dataset>`."
        )
    if path.suffix == ".jsonl":
        documents = _jsonl_documents(path, config.text_field)
    else:
        documents = _text_file_documents(path)
    if not documents:
        raise DataError(f"source={source!r}: the file holds no text.")
    return documents


def split_of(document: str, config: DataConfig) -> Split:
    bucket = int.from_bytes(hashlib.sha256(document.encode()).digest()[:4], "big") % 100
    if bucket < config.validation_percent:
        return "validation"
    if bucket < config.validation_percent + config.calibration_percent:
        return "calibration"
    return "train"


def split_documents(config: DataConfig, split: Split) -> list[str]:
    if split not in SPLITS:
        raise DataError(f"split={split!r}: choose one of {', '.join(SPLITS)}.")
    return [doc for doc in load_documents(config) if split_of(doc, config) == split]
