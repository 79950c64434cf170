"""Evaluation core: did a LoRA make a model follow its prompts better? Base and LoRAs on the same prompts and seeds.

:func:`generate` renders every (prompt, seed) with a stock diffusers pipeline, once per model (the base model and
each LoRA, loaded into the same pipeline and unloaded after), with the same noise for every model. A *scorer*
turns images into per-image metrics; :func:`summarize` gives each metric's mean with a bootstrap 95% confidence
interval, and the paired difference to the base model (the same prompts and seeds, resampled together);
:func:`side_by_side` draws the images of every model next to each other.

A scorer is any object with ``name`` and ``score(images, prompts) -> list[dict[str, float]]`` (images: RGB uint8
arrays ``[H, W, 3]``): the shapes world's exact judge is one (``benchmarks/efficacy``); the real-model scorers
(BLIP-VQA, GroundingDINO, CLIPScore) are in ``utils.scorers``. A metric that does not apply to an image is NaN and
is left out of its mean (and, paired, of the difference). :func:`markdown_table` writes a summary as a table.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch


class Scorer(Protocol):
    name: str

    def score(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[dict[str, float]]: ...


@dataclass
class Generation:
    """The images of one model: ``images[i]`` is ``prompts[i]`` rendered with ``seeds[i]``."""

    model: str
    prompts: list[str]
    seeds: list[int]
    images: list[np.ndarray] = field(default_factory=list)
    scores: list[dict[str, float]] = field(default_factory=list)


def generate(pipeline, models: Mapping[str, str | None], prompts: Sequence[str], seeds: Sequence[int], batch_size=16,
             show_progress=True, **pipeline_kwargs) -> dict[str, Generation]:
    """Render every (prompt, seed) pair with each model; ``models`` maps a name to a LoRA folder (None: the base).

    Each image's noise comes from its own ``torch.Generator().manual_seed(seed)``, so a (prompt, seed) pair gets
    the same starting noise whatever the model, batch or order."""
    from tqdm.auto import tqdm

    pairs = [(prompt, seed) for prompt in prompts for seed in seeds]
    results = {}
    for name, lora in models.items():
        if lora is not None:
            pipeline.load_lora_weights(lora, adapter_name="evaluated", use_safetensors=True)
        generation = Generation(name, [p for p, _ in pairs], [s for _, s in pairs])
        for start in tqdm(range(0, len(pairs), batch_size), desc=f"Generating ({name})", disable=not show_progress):
            batch = pairs[start : start + batch_size]
            output = pipeline(
                [p for p, _ in batch], generator=[torch.Generator().manual_seed(s) for _, s in batch], output_type="np",
                **pipeline_kwargs,
            )
            generation.images += [(image * 255).round().astype(np.uint8) for image in output.images]
        if lora is not None:
            pipeline.unload_lora_weights()
        results[name] = generation
    return results


def score(generations: Mapping[str, Generation], scorers: Scorer | Sequence[Scorer]) -> None:
    """Each generation's ``scores``: per image, the metrics of every scorer merged into one dict."""
    scorers = [scorers] if hasattr(scorers, "score") else list(scorers)
    for generation in generations.values():
        generation.scores = [{} for _ in generation.images]
        for scorer in scorers:
            for merged, scores in zip(generation.scores, scorer.score(generation.images, generation.prompts), strict=True):
                merged.update(scores)


def bootstrap_ci(values, num_resamples=2000, seed=0, confidence=0.95):
    """Mean of ``values`` and its percentile-bootstrap confidence interval ``(mean, low, high)``."""
    values = np.asarray(values, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (num_resamples, len(values)))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    return float(values.mean()), float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail))


def summarize(generations: Mapping[str, Generation], baseline: str, num_resamples=2000, seed=0) -> dict:
    """Per model and metric: mean, 95% CI and ``n`` (images the metric applies to); for every other model also
    the paired difference to ``baseline`` over the images where both have the metric."""
    summary = {}
    base = generations[baseline]
    for name, generation in generations.items():
        if (generation.prompts, generation.seeds) != (base.prompts, base.seeds):
            raise ValueError(f"{name} was not rendered on the prompts and seeds of {baseline}.")
        metrics = {}
        for metric in dict.fromkeys(key for scores in generation.scores for key in scores):
            values = np.asarray([s.get(metric, np.nan) for s in generation.scores], dtype=np.float64)
            applies = np.isfinite(values)
            if not applies.any():
                continue
            mean, low, high = bootstrap_ci(values[applies], num_resamples, seed)
            metrics[metric] = {"mean": mean, "ci95": [low, high], "n": int(applies.sum())}
            if name != baseline:
                base_values = np.asarray([s.get(metric, np.nan) for s in base.scores], dtype=np.float64)
                paired = applies & np.isfinite(base_values)
                if paired.any():
                    mean, low, high = bootstrap_ci(values[paired] - base_values[paired], num_resamples, seed)
                    metrics[metric]["difference_to_" + baseline] = {"mean": mean, "ci95": [low, high]}
        summary[name] = metrics
    return summary


def markdown_table(summary: dict, baseline: str, metrics: Sequence[str] | None = None) -> str:
    """A markdown table of :func:`summarize`'s output: a row per model, per metric its mean [95% CI] and, for the
    other models, the difference to ``baseline`` [95% CI]."""
    metrics = list(metrics or dict.fromkeys(metric for model in summary.values() for metric in model))
    lines = ["| model | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for name, model_metrics in summary.items():
        cells = []
        for metric in metrics:
            entry = model_metrics.get(metric)
            if entry is None:
                cells.append("–")
                continue
            cell = f"{entry['mean']:.4f} [{entry['ci95'][0]:.4f}, {entry['ci95'][1]:.4f}]"
            difference = entry.get("difference_to_" + baseline)
            if difference is not None:
                cell += f"<br>Δ {difference['mean']:+.4f} [{difference['ci95'][0]:+.4f}, {difference['ci95'][1]:+.4f}]"
            cells.append(cell)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def side_by_side(generations: Mapping[str, Generation], indices: Sequence[int], path: str, scale=4, caption=None):
    """A PNG: one row per image index (a prompt and seed), one column per model, each image scaled by ``scale``
    (below 1 for large images), with the prompt written on the left and each model's name on top;
    ``caption(model, index)`` adds a line under an image."""
    import textwrap

    from PIL import Image, ImageDraw

    names = list(generations)
    first = generations[names[0]].images[0]
    cell_h, cell_w = round(first.shape[0] * scale), round(first.shape[1] * scale)
    resample = Image.NEAREST if scale >= 1 else Image.BICUBIC
    label_w, header_h, footer_h, pad = 230, 16, 14 if caption else 0, 4
    width = label_w + len(names) * (cell_w + pad)
    height = header_h + len(indices) * (max(cell_h, 40) + footer_h + pad)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for column, name in enumerate(names):
        draw.text((label_w + column * (cell_w + pad), 2), name, fill="black")
    for row, index in enumerate(indices):
        top = header_h + row * (max(cell_h, 40) + footer_h + pad)
        generation = generations[names[0]]
        lines = textwrap.wrap(generation.prompts[index], 36)[:4] + [f"seed {generation.seeds[index]}"]
        for line_number, line in enumerate(lines):
            draw.text((2, top + line_number * 12), line, fill="gray" if line_number == len(lines) - 1 else "black")
        for column, name in enumerate(names):
            image = Image.fromarray(generations[name].images[index]).resize((cell_w, cell_h), resample)
            left = label_w + column * (cell_w + pad)
            canvas.paste(image, (left, top))
            if caption:
                draw.text((left, top + cell_h), caption(name, index), fill="black")
    canvas.save(path)
    return path
