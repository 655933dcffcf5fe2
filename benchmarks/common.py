"""Shared pieces of the benchmarks: a JSON + markdown table writer and the quantization benchmarks' held-out text."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

from nemo_optim.checkpoint import library_versions
from nemo_optim.data.corpus import DataConfig
from nemo_optim.data.packing import packed_sequences


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
