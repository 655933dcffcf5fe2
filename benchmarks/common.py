"""Shared pieces of the benchmarks: the results options (--rows / --note / --out), rows kept from the
previous results file, a JSON + markdown table writer and the quantization benchmarks' held-out text."""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path
from typing import Any

from nemo_optim.checkpoint import library_versions
from nemo_optim.data.corpus import DataConfig
from nemo_optim.data.packing import packed_sequences
from nemo_optim.cpu import cpu_allocator_env


RESULTS_DIR = Path("benchmarks/results")


def nemo_optim_process_env() -> dict[str, str]:
    """The environment of a child process that measures nemo-optim: what its executors give a job
    (`cpu.cpu_allocator_env`). The other sides of a comparison run in the plain environment,
    as their users would start them."""
    return {**os.environ, **cpu_allocator_env()}


def results_arguments(parser: argparse.ArgumentParser, rows: list[str] | None = None) -> None:
    """--note and --out for every benchmark; with `rows`, also --rows: a subset reruns only those rows
    and keeps the others from the previous results file (`merge_previous_rows`)."""
    if rows is not None:
        parser.add_argument("--rows", nargs="*", default=list(rows),
                            help=f"rows to run (default: all of {list(rows)}); with a subset, the other rows are kept "
                                 f"from the previous results file")
    parser.add_argument("--note", default="", help="appended to the notes (e.g. what shared the machine)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)


def check_rows(parser: argparse.ArgumentParser, chosen: list[str], rows: list[str]) -> None:
    unknown = [row for row in chosen if row not in rows]
    if unknown:
        parser.error(f"unknown rows {unknown}; valid: {list(rows)}")


def previous_results(name: str, out_dir: Path) -> dict[str, Any]:
    """The last results file of benchmark `name` ({} if none)."""
    path = out_dir / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def merge_previous_rows(rows: list[dict[str, Any]], previous: dict[str, Any], order: list[str],
                        key: str = "row") -> tuple[list[dict[str, Any]], list[str]]:
    """`rows` measured now, plus the rows of `order` they lack taken from `previous` (marked
    reused), sorted by `order`. Returns (rows, names of the reused rows)."""
    measured = {row[key] for row in rows}
    kept = {row[key]: row for row in previous.get("rows", [])}
    reused = [name for name in order if name not in measured and name in kept]
    merged = rows + [dict(kept[name], reused=True) for name in reused]
    merged.sort(key=lambda row: order.index(row[key]) if row[key] in order else len(order))
    return merged, reused


def reference_on_held_out(model_name: str, seq_length: int, num_sequences: int):
    """(loaded fp32 model, tokenizer, held-out tokens, its evaluation) for benchmarks/ptq.py and
    qad.py. The held-out text is standard-library docstrings: their calibration and training text
    is pydoc's, so any split of the docstrings is held out; "train" is the largest. Call inside
    `runtime.parallel_runtime()`."""
    from nemo_optim.evaluation import evaluate_model
    from nemo_optim.models.loader import load_model, load_tokenizer

    base = load_model(model_name)
    tokenizer = load_tokenizer(base.hf_dir)
    held_out = packed_sequences(DataConfig(source="embedded:docstrings", seq_length=seq_length), "train", tokenizer,
                                num_sequences)
    return base, tokenizer, held_out, evaluate_model(base.model, held_out)


def write_results(name: str, rows: list[dict[str, Any]], columns: list[tuple[str, str]], notes: str, out_dir: Path,
                  extra: dict[str, Any] | None = None) -> Path:
    """Writes <out_dir>/<name>.json (with `extra` fields) and <name>.md (a table with `columns`: (key, header))."""
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "machine": platform.platform(), "versions": library_versions(), "notes": notes,
               **(extra or {}), "rows": rows}
    (out_dir / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")

    def cell(value):
        if isinstance(value, float):
            return f"{value:.4g}"
        return "-" if value is None else str(value)

    lines = [f"# {name}", "", notes, "", "| " + " | ".join(h for _, h in columns) + " |",
             "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(key)) for key, _ in columns) + " |" for row in rows]
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return out_dir / f"{name}.md"
