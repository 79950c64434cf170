"""Evaluation prompts: a built-in set per category, disjoint from the built-in training prompts, and user files.

``pipeline_comat.py evaluate --prompts`` and the training scripts' ``--eval_prompts`` take a *prompt spec*:

* ``builtin:CATEGORY`` — one of :data:`EVAL_CATEGORIES` (T2I-CompBench's categories), or several joined by commas
  (``builtin:color,spatial``), or ``builtin:all``;
* a path to a text file, one prompt a line (T2I-CompBench's ``*_val.txt`` files work as they are); its category is
  the file name without extension, so ``color_val.txt`` is scored as ``color``.

The built-in sets are drawn from the same templates and word lists as the training prompts (``utils.prompts``) with
other seeds, and every training prompt is excluded, so a LoRA trained on the built-in prompts is measured on prompts
it never saw. The non-spatial set uses people the training set never names ("a chef reading a map"); the spatial set
only relations that 2-D boxes can decide (no "in front of"/"behind").
"""

import os
import random
from functools import lru_cache

from . import prompts as training

EVAL_CATEGORIES = ("color", "shape", "texture", "spatial", "non_spatial", "complex")
BUILTIN_PREFIX = "builtin:"
EVAL_PROMPTS_PER_CATEGORY = 300

# Relations a pair of boxes decides (utils.scorers.RELATION_RULES); "in front of" and "behind" need depth.
EVAL_SPATIAL_RELATIONS = ("on the left of", "on the right of", "next to", "beside", "near", "above", "below")
EVAL_SUPPORT_PROMPTS = 60

# People the training prompts never name: the non-spatial evaluation asks for known actions by new subjects.
EVAL_HUMAN_SUBJECTS = (
    "chef", "teacher", "farmer", "nurse", "doctor", "student", "musician", "police officer", "firefighter",
    "grandmother", "grandfather", "teenager", "young man", "businessman",
)  # fmt: skip

# Distinct from utils.prompts' seeds (1–7 and their +100 offsets).
_EVAL_SEED = 1000


def _draw_person_action(rng: random.Random):
    subject = rng.choice(EVAL_HUMAN_SUBJECTS)
    verb = rng.choice(tuple(training.HUMAN_ACTIONS))
    thing = rng.choice(training.HUMAN_ACTIONS[verb])
    if not training._heads_distinct(subject, thing):
        return None
    return f"{training._with_article(subject)} {verb} {training._with_article(thing)}"


def _sample(offset: int, count: int, draw) -> list[str]:
    return training._sample_unique(_EVAL_SEED + offset, count, draw, exclude=_training_prompts())


@lru_cache(maxsize=1)
def _training_prompts() -> frozenset:
    return frozenset(training.builtin_prompts())


@lru_cache(maxsize=1)
def _eval_categories() -> tuple[tuple[str, tuple[str, ...]], ...]:
    count = EVAL_PROMPTS_PER_CATEGORY
    spatial = _sample(40, count - EVAL_SUPPORT_PROMPTS, training._spatial_draw(EVAL_SPATIAL_RELATIONS))
    spatial += _sample(41, EVAL_SUPPORT_PROMPTS, training._draw_support)
    complex_prompts = []
    per_template = count // len(training.COMPLEX_DRAWS)
    for offset, draw in enumerate(training.COMPLEX_DRAWS):
        complex_prompts += _sample(70 + offset, per_template, draw)
    return (
        ("color", tuple(_sample(10, count, training._draw_color))),
        ("shape", tuple(_sample(20, count, training._draw_shape))),
        ("texture", tuple(_sample(30, count, training._draw_texture))),
        ("spatial", tuple(spatial)),
        ("non_spatial", tuple(_sample(50, count, _draw_person_action))),
        ("complex", tuple(complex_prompts)),
    )


def builtin_eval_prompt_categories() -> dict[str, list[str]]:
    """The built-in evaluation prompts by category (:data:`EVAL_CATEGORIES`), 300 each, identical in every call."""
    return {name: list(prompts) for name, prompts in _eval_categories()}


def load_eval_prompts(spec: str, flag: str = "--prompts", max_per_category: int | None = None) -> dict[str, list[str]]:
    """The prompts a spec names (see the module docstring), by category; ``max_per_category`` keeps the first N.

    Raises:
        ValueError: an unknown category, a missing or empty file — the message names ``flag`` and the fix.
    """
    if spec.startswith(BUILTIN_PREFIX):
        names = spec[len(BUILTIN_PREFIX):].split(",")
        names = list(EVAL_CATEGORIES) if names == ["all"] else names
        unknown = [name for name in names if name not in EVAL_CATEGORIES]
        if unknown:
            raise ValueError(
                f"{flag} {spec}: no built-in category {', '.join(map(repr, unknown))}; choose from "
                f"{', '.join(EVAL_CATEGORIES)} (comma-separated) or 'all', or give a text file with one prompt a line."
            )
        builtin = builtin_eval_prompt_categories()
        categories = {name: builtin[name] for name in dict.fromkeys(names)}
    else:
        if not os.path.isfile(spec):
            raise ValueError(
                f"{flag} {spec}: no such file. Give a text file with one prompt a line, or builtin:CATEGORY with "
                f"CATEGORY in {', '.join(EVAL_CATEGORIES)} (or 'all')."
            )
        with open(spec, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
        prompts = [line for line in lines if line]
        if not prompts:
            raise ValueError(f"{flag} {spec}: the file holds no prompt (one prompt a line).")
        categories = {os.path.splitext(os.path.basename(spec))[0]: prompts}
    if max_per_category is not None:
        categories = {name: prompts[:max_per_category] for name, prompts in categories.items()}
    return categories


def category_of(name: str) -> str | None:
    """The built-in category a prompt set's name refers to: ``color`` for ``color`` and ``color_val`` (a
    T2I-CompBench file name); None when it is none of them (every scorer then runs)."""
    for category in sorted(EVAL_CATEGORIES, key=len, reverse=True):
        if name == category or name.startswith(category + "_"):
            return category
    return None
