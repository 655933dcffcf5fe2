"""The compression report: one row per model of a pipeline (size, parameters, perplexity, KL
and top-1 agreement to the original, task accuracy with its 95% interval, tokens/s, and decode
tokens/s served by vLLM where its engine venv exists) as markdown, plus PNG plots of those numbers
and of the distillation loss curves; and for draft heads, speculative decoding's acceptance
length and speed-up per draft length.

    python -c "from nemo_optim.report import report; report(...)"
"""

# No `from __future__ import annotations`: NeMo-Run's CLI parser reads report's annotations.

import json
from pathlib import Path
from typing import Optional

from nemo_optim import checkpoint


def _size_bytes(model_path: str) -> Optional[int]:
    """Bytes of the weights as stored (a GGUF file, an HF directory, a checkpoint's weights/)."""
    from nemo_optim.models.loader import resolve_source

    path = resolve_source(model_path).path
    if path.is_file():
        return path.stat().st_size
    weights = path / checkpoint.WEIGHTS_DIR if checkpoint.is_checkpoint(path) else path
    return sum(f.stat().st_size for f in weights.rglob("*") if f.is_file())


def _parameters(model_path: str) -> int:
    from nemo_optim.models.loader import read_model_config

    return read_model_config(model_path)[0].num_parameters()


def _row(label: str, model_path: str, evaluation_path: str, artifact: str) -> dict:
    result = json.loads(Path(evaluation_path).read_text())
    accuracy = result.get("task_accuracy") or {}
    return {
        "model": label, "path": model_path, "artifact": artifact,
        "parameters_m": _parameters(model_path) / 1e6,
        "size_mb": _size_bytes(artifact) / 2**20,
        "perplexity": result["perplexity"],
        "kl_to_original": result.get("kl_to_reference"),
        "top1_agreement": result.get("top1_agreement"),
        "tokens_per_second": result["tokens_per_second"],
        "accuracy_task": accuracy.get("task"),
        "accuracy_items": accuracy.get("items"),
        "accuracy_norm": accuracy.get("accuracy_norm"),
        "accuracy_norm_ci95": _interval(accuracy.get("ci95_norm")),
    }


def _servable_dir(model_path: str, artifact: str) -> Optional[Path]:
    """The HF directory an engine can load for a row: its artifact if that is one, else the
    model's own HF weights (an HF directory or a converted GGUF); None for a native checkpoint."""
    from nemo_optim.models.loader import resolve_source

    for path in (Path(artifact), resolve_source(model_path).path):
        if path.is_file() and path.suffix == ".gguf":
            from nemo_optim.models.hf import gguf_to_hf

            return gguf_to_hf(path)
        if path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors")):
            return path
    return None


def _served(rows: list[dict]) -> list[str]:
    """Adds each row's decode tokens/s in vLLM's engine (`served_tokens_per_second`) and returns
    note lines: what could not be served and why, or how to get the engine."""
    from nemo_optim.serving import engine_job, engine_python, run_engine

    if engine_python() is None:
        return ["Served tokens/s: `make engine-venv` builds vLLM's CPU engine (.venv-vllm); the report then serves "
                "each row's HF export in it."]
    import torch

    jobs, notes = [], []
    for row in rows:
        directory = _servable_dir(row["path"], row["artifact"])
        if directory is None:
            notes.append(f"{row['model']}: a native checkpoint without an HF export, not served")
            continue
        prompt = torch.arange(1, 65)[None]  # (token ids: the speed does not depend on the text)
        jobs.append(engine_job(row["model"], directory, prompt, dtype="auto", new_tokens=1, prompt_logprobs=0,
                               timing={"decode_tokens": 64, "decode_prompts": 1, "repeats": 1}, timing_only=True))
    for result in run_engine(jobs) if jobs else []:
        row = next(r for r in rows if r["model"] == result["name"])
        if "error" in result:
            notes.append(f"{row['model']}: not served here ({result['error']})")
        else:
            row["served_tokens_per_second"] = result["timing"]["decode_tokens_per_s"]
    return ["Served tokens/s: decode speed in vLLM's CPU engine (one prompt, 64 new tokens, batch 1)"
            + (": " + "; ".join(notes) if notes else "") + "."]


def _interval(bounds) -> Optional[str]:
    return f"{bounds[0]:.2f}-{bounds[1]:.2f}" if bounds else None


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _plots(rows: list[dict], metrics_path: Optional[Path], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")  # files only, no screen
    import matplotlib.pyplot as plt

    images = []
    labels = [row["model"] for row in rows]
    panels = [("parameters_m", "parameters (M)"), ("perplexity", "held-out perplexity"),
              ("kl_to_original", "KL to the original (nats/token)")]
    if any(row["accuracy_norm"] is not None for row in rows):
        panels.append(("accuracy_norm", "task accuracy (acc_norm)"))
    figure, axes = plt.subplots(1, len(panels), figsize=(4.7 * len(panels), 4))
    for axis, (key, title) in zip(axes, panels):
        axis.bar(labels, [row[key] or 0 for row in rows], color="#4c72b0")
        axis.set_title(title)
        axis.tick_params(axis="x", rotation=30)
    figure.tight_layout()
    figure.savefig(out_dir / "models.png", dpi=100)
    plt.close(figure)
    images.append("models.png")

    if metrics_path is not None and metrics_path.is_file():
        history = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
        train = [row for row in history if row["kind"] == "train"]
        validation = [row for row in history if row["kind"] == "validation"]
        figure, axis = plt.subplots(figsize=(7, 4))
        for key in ("logits_loss", "intermediate_loss", "lm_loss"):
            points = [(row["step"], row[key]) for row in train if row.get(key)]
            if points:
                axis.plot(*zip(*points), label=f"train {key}")
        points = [(row["step"], row["lm_loss"]) for row in validation if "lm_loss" in row]
        if points:
            axis.plot(*zip(*points), "o-", label="validation lm_loss")
        axis.set_xlabel("step")
        axis.set_ylabel("loss (nats)")
        axis.set_title("distillation")
        axis.legend()
        figure.tight_layout()
        figure.savefig(out_dir / "distillation_loss.png", dpi=100)
        plt.close(figure)
        images.append("distillation_loss.png")
    return images


def _table(columns: list[tuple[str, str]], rows: list[dict]) -> list[str]:
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(_cell(row.get(key)) for key, _ in columns) + " |" for row in rows]


def _speculative_rows(drafts: dict) -> list[dict]:
    """One row per (draft, draft length) from each speculative checkpoint's evaluation.json."""
    rows = []
    for label, path in drafts.items():
        evaluation = Path(path) / "evaluation.json"
        if not evaluation.is_file():
            raise FileNotFoundError(f"report: {evaluation} is missing; run the speculative stage for {label!r} first.")
        rows += [{"draft": label, **result} for result in json.loads(evaluation.read_text())["results"]]
    return rows


def _speculative_plot(rows: list[dict], out_dir: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for label in dict.fromkeys(row["draft"] for row in rows):
        points = [row for row in rows if row["draft"] == label]
        lengths = [row["draft_length"] for row in points]
        axes[0].plot(lengths, [row["acceptance_length"] for row in points], "o-", label=label)
        axes[1].plot(lengths, [row["speedup"] for row in points], "o-", label=label)
    for axis, title in zip(axes, ("acceptance length (tokens per base forward)", "speed-up over KV-cached greedy")):
        axis.set_xlabel("draft tokens")
        axis.set_title(title)
        axis.legend()
    axes[1].axhline(1.0, color="grey", linewidth=0.8)
    figure.tight_layout()
    figure.savefig(out_dir / "speculative.png", dpi=100)
    plt.close(figure)
    return "speculative.png"


def report(
    *,
    output_dir: str,
    models: dict,
    evaluations: dict,
    distillation_metrics: Optional[str] = None,
    artifacts: Optional[dict] = None,
    speculative: Optional[dict] = None,
    title: str = "Compression report",
) -> Path:
    """Writes `<output_dir>/report.md`, `report.json` and PNG plots.

    Args:
        models: label -> model path (native checkpoint or export), in pipeline order.
        evaluations: label -> the JSON an `evaluate` stage wrote for that model.
        distillation_metrics: metrics.jsonl of the distillation run (loss curves).
        artifacts: label -> what is deployed (e.g. the FP8 HF export), whose size on disk is
            reported; default: the model path itself.
        speculative: label -> a `speculative` stage's output (its evaluation.json is reported).
    """
    artifacts = {**models, **(artifacts or {})}
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    missing = [label for label in models if not Path(evaluations.get(label, "")).is_file()]
    if missing:
        raise FileNotFoundError(f"report: no evaluation for {', '.join(missing)}; run their evaluate stages first.")
    rows = [_row(label, str(path), evaluations[label], str(artifacts[label])) for label, path in models.items()]
    speculative_rows = _speculative_rows(speculative or {})
    lines, images = [f"# {title}", ""], []
    if rows:
        images = _plots(rows, Path(distillation_metrics) if distillation_metrics else None, out_dir)
        served_notes = _served(rows)
        lines += _table([("model", "model"), ("parameters_m", "params (M)"), ("size_mb", "on disk (MiB)"),
                         ("perplexity", "ppl"), ("kl_to_original", "KL to original"),
                         ("top1_agreement", "top-1 agree"), ("accuracy_norm", "accuracy"),
                         ("accuracy_norm_ci95", "accuracy 95% CI"), ("tokens_per_second", "tokens/s"),
                         ("served_tokens_per_second", "served tokens/s (vLLM)")], rows)
        tasks = {(row["accuracy_task"], row["accuracy_items"]) for row in rows if row["accuracy_task"]}
        if tasks:
            lines += ["", "Accuracy: " + "; ".join(f"`{task}`, {items} items" for task, items in sorted(tasks))
                      + " (length-normalised log-likelihood choice, lm-eval's acc_norm; "
                      "95% Wilson interval: differences inside it are noise)."]
        lines += ["", *served_notes]
        lines += ["", "Evaluated: " + "; ".join(f"{row['model']}: `{row['path']}`" for row in rows),
                  "", "On disk: " + "; ".join(f"{row['model']}: `{row['artifact']}`" for row in rows), ""]
    if speculative_rows:
        images.append(_speculative_plot(speculative_rows, out_dir))
        lines += ["## Speculative decoding", "",
                  "Greedy decoding of held-out prompts, batch 1; acceptance length = tokens per verifying base "
                  "forward; speed-up over plain greedy decoding with a KV cache on the same machine; identical = "
                  "prompts whose output equals plain greedy decoding token for token.", ""]
        lines += _table([("draft", "draft"), ("draft_length", "draft tokens"),
                         ("acceptance_length", "acceptance length"), ("tokens_per_second", "tokens/s"),
                         ("baseline_tokens_per_second", "greedy tokens/s"), ("speedup", "speed-up"),
                         ("identical_prompts", "identical"), ("num_prompts", "prompts")], speculative_rows)
        lines += ["", "Drafts: " + "; ".join(f"{label}: `{path}`" for label, path in (speculative or {}).items()), ""]
    lines += [f"![{image}]({image})" for image in images]
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")
    (out_dir / "report.json").write_text(json.dumps({"rows": rows, "speculative": speculative_rows,
                                                     "images": images}, indent=2) + "\n")
    print(f"report: {out_dir / 'report.md'}", flush=True)
    return out_dir / "report.md"
