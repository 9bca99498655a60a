"""Metrics of gathered per-prompt samples, as summary rows (one per sampler setting) and per-prompt rows,
plus their markdown tables."""
from __future__ import annotations

import math
from typing import Any

import torch

from rcm.data.metrics import diversity, teacher_student_agreement, toy_metrics
from rcm.data.toy import ToyMixture
from rcm.eval.metrics_plugins import MetricSpec
from rcm.eval.sampling import STUDENT, SamplerSetting

TOY_KEYS = ("precision", "recall", "mode_kl", "sliced_wasserstein")
# (row key, column header, format) in table order; a column appears when some row has the key.
COLUMNS = (
    ("prompt_index", "prompt", "{}"),
    ("prompt", "text", "{}"),
    ("model", "model", "{}"),
    ("steps", "steps", "{}"),
    ("precision", "precision ↑", "{:.3f}"),
    ("recall", "mode recall ↑", "{:.3f}"),
    ("mode_kl", "mode KL ↓", "{:.3f}"),
    ("sliced_wasserstein", "sliced W2 ↓", "{:.3f}"),
    ("diversity", "diversity", "{:.3f}"),
    ("agreement_mse", "MSE vs teacher ↓", "{:.4f}"),
    ("agreement_cosine", "cosine vs teacher ↑", "{:.3f}"),
    ("agreement_psnr", "PSNR vs teacher (dB) ↑", "{:.2f}"),
)


def summarize(metrics: dict[str, Any]) -> dict[str, float]:
    """The averaged scalars of a toy_metrics result."""
    return {key: float(metrics[key]) for key in TOY_KEYS if key in metrics}


def prompt_rows(
    records: list[dict], settings: list[SamplerSetting], labels: dict[str, str], mixture: ToyMixture | None,
    reference: str | None = None,
) -> list[dict[str, Any]]:
    """One row per (prompt, setting): toy metrics of the prompt's class, diversity, agreement with `reference`."""
    rows = []
    for record in records:
        class_id = record["class_id"]
        for setting in settings:
            samples = record["samples"][setting.name]
            row: dict[str, Any] = {
                "prompt_index": record["prompt_index"], "prompt": record["prompt"],
                "model": labels[setting.name], "steps": setting.steps,
            }
            if mixture is not None and class_id is not None:
                metrics = toy_metrics(samples, torch.full((len(samples),), class_id), mixture)
                row.update({key: metrics[f"{key}_per_class"][class_id] for key in TOY_KEYS})
            if len(samples) > 1:
                row["diversity"] = diversity(samples)
            if _compared_with_reference(setting, reference):
                row.update(_agreement(samples, record["samples"][reference]))
            rows.append(row)
    return rows


def summary_rows(
    records: list[dict], settings: list[SamplerSetting], labels: dict[str, str], mixture: ToyMixture | None,
    reference: str | None = None, metric_specs: list[MetricSpec] = (),
) -> list[dict[str, Any]]:
    """One row per setting over all prompts: toy metrics (class means), mean diversity, agreement, plug-ins."""
    class_ids = [record["class_id"] for record in records]
    toy = mixture is not None and all(class_id is not None for class_id in class_ids)
    rows = []
    for setting in settings:
        per_prompt = [record["samples"][setting.name] for record in records]
        samples = torch.cat(per_prompt)
        row: dict[str, Any] = {"model": labels[setting.name], "steps": setting.steps, "setting": setting.name}
        if toy:
            ids = torch.cat([torch.full((len(s),), c) for s, c in zip(per_prompt, class_ids)])
            row.update(summarize(toy_metrics(samples, ids, mixture)))
        if all(len(s) > 1 for s in per_prompt):
            row["diversity"] = sum(diversity(s) for s in per_prompt) / len(per_prompt)
        if _compared_with_reference(setting, reference):
            row.update(_agreement(samples, torch.cat([record["samples"][reference] for record in records])))
        for spec in metric_specs:
            metric = spec.build()
            for record, prompt_samples in zip(records, per_prompt):
                metric.update(prompt_samples, [record["prompt"]] * len(prompt_samples))
            row.update({name: float(value) for name, value in metric.compute().items()})
        rows.append(row)
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Rows as a markdown table: the known columns present in some row, then any other numeric keys."""
    known = [column for column in COLUMNS if any(column[0] in row for row in rows)]
    known_keys = {key for key, _, _ in COLUMNS} | {"setting"}
    extra = sorted({key for row in rows for key, value in row.items() if key not in known_keys and isinstance(value, float)})
    columns = known + [(key, key, "{:.4f}") for key in extra]
    lines = [
        "| " + " | ".join(header for _, header, _ in columns) + " |",
        "|" + "|".join("---" if key in ("prompt", "model") else "---:" for key, _, _ in columns) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(key), fmt) for key, _, fmt in columns) + " |")
    return "\n".join(lines)


def _compared_with_reference(setting: SamplerSetting, reference: str | None) -> bool:
    """Student settings are compared with the reference teacher's samples, when there is one."""
    return reference is not None and setting.kind == STUDENT and setting.name != reference


def _agreement(student: torch.Tensor, teacher: torch.Tensor) -> dict[str, float]:
    """teacher_student_agreement with report keys."""
    return {f"agreement_{key}": value for key, value in teacher_student_agreement(student, teacher).items()}


def _cell(value: Any, fmt: str) -> str:
    """One table cell: '–' for a missing value, the format for numbers, text with pipes escaped."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, str):
        return value.replace("|", "\\|")
    return fmt.format(value)
