"""Alignment evaluation: the built-in evaluation prompts, the real-model scorers (BLIP-VQA, GroundingDINO, CLIPScore)
on hand-built cases and end to end on tiny models, and NaN-aware summaries."""

import math

import numpy as np
import pytest
import torch

from utils import evaluation
from utils.entities import load_spacy_model
from utils.eval_prompts import (
    EVAL_CATEGORIES,
    EVAL_HUMAN_SUBJECTS,
    builtin_eval_prompt_categories,
    category_of,
    load_eval_prompts,
)
from utils.prompts import HUMAN_SUBJECTS, builtin_prompts
from utils.scorers import (
    BlipVqaScorer,
    ClipScorer,
    DetectionScorer,
    add_three_in_one,
    detection_metrics,
    find_relation,
    non_maximum_suppression,
    object_phrases,
    relation_holds,
    yes_probability_product,
)


@pytest.fixture(scope="module")
def nlp():
    return load_spacy_model("en_core_web_sm")


def random_images(count, side=32):
    return [np.random.default_rng(index).integers(0, 256, (side, side, 3), dtype=np.uint8) for index in range(count)]


# ---------------------------------------------------------------------------------------------------- prompts


def test_builtin_eval_prompts_are_disjoint_from_training_distinct_and_stable(nlp):
    categories = builtin_eval_prompt_categories()
    assert tuple(categories) == EVAL_CATEGORIES
    training = set(builtin_prompts())
    every = [prompt for prompts in categories.values() for prompt in prompts]
    assert all(len(prompts) == 300 for prompts in categories.values())
    assert len(set(every)) == len(every) and not set(every) & training
    assert builtin_eval_prompt_categories() == categories
    # the non-spatial set asks for people the training prompts never name
    assert not set(EVAL_HUMAN_SUBJECTS) & set(HUMAN_SUBJECTS)
    # every spatial prompt names a relation that boxes decide, between two objects
    detector = DetectionScorer(None, None, nlp)
    for prompt in categories["spatial"]:
        _, spans = detector.objects(prompt)
        assert find_relation(prompt, spans) is not None, prompt


def test_prompt_specs_and_their_errors_name_the_flag(tmp_path):
    assert list(load_eval_prompts("builtin:color,spatial", max_per_category=3)) == ["color", "spatial"]
    assert len(load_eval_prompts("builtin:shape", max_per_category=3)["shape"]) == 3
    assert list(load_eval_prompts("builtin:all")) == list(EVAL_CATEGORIES)
    file = tmp_path / "non_spatial_val.txt"  # a T2I-CompBench file name
    file.write_text("a chef reading a map\n\n  a nurse holding a cup \n")
    assert load_eval_prompts(str(file)) == {"non_spatial_val": ["a chef reading a map", "a nurse holding a cup"]}
    assert category_of("non_spatial_val") == "non_spatial" and category_of("spatial_val") == "spatial"
    assert category_of("color") == "color" and category_of("my_prompts") is None

    with pytest.raises(ValueError, match=r"--eval_prompts builtin:colour: no built-in category 'colour'; choose from color"):
        load_eval_prompts("builtin:colour", "--eval_prompts")
    with pytest.raises(ValueError, match="--prompts missing.txt: no such file"):
        load_eval_prompts("missing.txt")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="holds no prompt"):
        load_eval_prompts(str(tmp_path / "empty.txt"))


# ---------------------------------------------------------------------------------------------------- BLIP-VQA


def test_blip_vqa_asks_about_each_object_phrase_and_multiplies_the_yes_probabilities(nlp):
    assert object_phrases("a red book and a yellow vase", nlp) == ["a red book", "a yellow vase"]
    assert object_phrases("three black cats on the left of a red sofa", nlp) == ["three black cats", "a red sofa"]
    assert object_phrases("a man riding a horse", nlp) == ["a man", "a horse"]
    assert yes_probability_product([0.5, 0.8]) == pytest.approx(0.4)
    assert yes_probability_product([]) == 1.0


def test_blip_vqa_scorer_matches_the_models_own_answer_and_scores_per_question(tiny_blip_vqa_path):
    scorer = BlipVqaScorer.from_pretrained(tiny_blip_vqa_path, spacy_model="en_core_web_sm", show_progress=False)
    images = random_images(2)
    # P(yes) against P(no) of the first answer token, as the model's own generate() scores it
    inputs = scorer.processor(images=images[0], text="a red book?", return_tensors="pt")
    generated = scorer.model.generate(**inputs, max_new_tokens=1, output_scores=True, return_dict_in_generate=True, do_sample=False)
    expected = generated.scores[0][0, scorer.answer_ids].softmax(dim=-1)[0]
    # batched with a longer (padded) question, the short question's answer does not change
    probabilities = scorer.yes_probabilities([images[0], images[1]], ["a red book?", "a yellow vase on the left?"])
    assert probabilities[0].item() == pytest.approx(expected.item(), abs=1e-5)

    prompts = ["a red book and a yellow vase", "a blue cat"]
    scores = scorer.score(images, prompts)
    alone = scorer.yes_probabilities([images[0]] * 2, ["a red book?", "a yellow vase?"])
    assert scores[0]["blip_vqa"] == pytest.approx(alone.prod().item(), abs=1e-5)
    assert scores[1]["blip_vqa"] == pytest.approx(scorer.yes_probabilities([images[1]], ["a blue cat?"]).item(), abs=1e-5)


# ---------------------------------------------------------------------------------------------------- detection


@pytest.mark.parametrize(
    "relation, subject_center, object_center, holds",
    [
        ("on the left of", (0.2, 0.5), (0.8, 0.5), True),
        ("on the left of", (0.8, 0.5), (0.2, 0.5), False),
        ("on the right of", (0.8, 0.5), (0.2, 0.5), True),
        ("above", (0.5, 0.2), (0.5, 0.8), True),
        ("on top of", (0.5, 0.8), (0.5, 0.2), False),
        ("below", (0.5, 0.8), (0.5, 0.2), True),
        ("under", (0.5, 0.2), (0.5, 0.8), False),
        ("next to", (0.2, 0.5), (0.8, 0.55), True),
        ("next to", (0.5, 0.2), (0.55, 0.8), False),
        ("near", (0.5, 0.2), (0.55, 0.8), True),
    ],
)
def test_spatial_rule_on_box_centres(relation, subject_center, object_center, holds):
    def box(center):
        return [center[0] - 0.1, center[1] - 0.1, center[0] + 0.1, center[1] + 0.1]

    assert relation_holds(relation, box(subject_center), box(object_center)) is holds


def test_relation_objects_presence_and_counts_from_hand_built_detections(nlp):
    detector = DetectionScorer(None, None, nlp)
    left, right = torch.tensor([[0.0, 0.4, 0.2, 0.6]]), torch.tensor([[0.7, 0.4, 0.9, 0.6]])
    prompt = "a dog on the left of a cat"
    queries, spans = detector.objects(prompt)
    assert queries == ["dog", "cat"]
    # "on the left of", not the shorter "left of" inside it
    assert find_relation(prompt, spans) == (0, "on the left of", 1)
    metrics = detection_metrics(prompt, spans, [left, right])
    assert metrics["spatial"] == 1.0 and metrics["objects_present"] == 1.0 and math.isnan(metrics["counting"])
    assert detection_metrics(prompt, spans, [right, left])["spatial"] == 0.0
    missing = detection_metrics(prompt, spans, [left, torch.zeros(0, 4)])
    assert missing["spatial"] == 0.0 and missing["objects_present"] == 0.0

    prompt = "three black cats on the left of a red sofa"
    queries, spans = detector.objects(prompt)
    three = torch.tensor([[0.0, 0.0, 0.1, 0.1], [0.0, 0.3, 0.1, 0.4], [0.2, 0.6, 0.3, 0.7]])
    assert detection_metrics(prompt, spans, [three, right])["counting"] == 1.0
    assert detection_metrics(prompt, spans, [three[:2], right])["counting"] == 0.0
    # no relation, no object: the metrics do not apply
    queries, spans = detector.objects("a red book and a yellow vase")
    assert math.isnan(detection_metrics("a red book and a yellow vase", spans, [left, right])["spatial"])
    assert all(math.isnan(value) for value in detection_metrics("hello", [], []).values())


def test_non_maximum_suppression_merges_a_duplicate_box():
    boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.02, 0.0, 0.52, 0.5], [0.6, 0.6, 0.9, 0.9]])
    kept = non_maximum_suppression(boxes, torch.tensor([0.5, 0.9, 0.4]))
    assert kept.tolist() == [1, 2]


def test_detection_scorer_runs_grounding_dino_end_to_end(tiny_grounding_dino_path):
    scorer = DetectionScorer.from_pretrained(
        tiny_grounding_dino_path, spacy_model="en_core_web_sm", box_threshold=0.0, text_threshold=0.0, show_progress=False
    )
    prompts = ["a dog on the left of a cat", "two red apples", "hello"]
    scores = scorer.score(random_images(3), prompts)
    assert scores[0]["objects_present"] == 1.0 and scores[0]["spatial"] in (0.0, 1.0)
    assert scores[1]["counting"] in (0.0, 1.0) and math.isnan(scores[1]["spatial"])
    assert all(math.isnan(value) for value in scores[2].values())


# ---------------------------------------------------------------------------------------------------- CLIPScore


def test_clip_score_is_a_cosine_independent_of_the_batch(tiny_clip_path):
    scorer = ClipScorer.from_pretrained(tiny_clip_path, show_progress=False)
    images = random_images(3)
    prompts = ["a chef reading a map", "a cat", "a very long prompt about a red book on top of a wooden table"]
    together = [s["clip_score"] for s in scorer.score(images, prompts)]
    alone = [scorer.score([image], [prompt])[0]["clip_score"] for image, prompt in zip(images, prompts)]
    assert together == pytest.approx(alone, abs=1e-5)
    assert all(-1 <= value <= 1 for value in together)


# ---------------------------------------------------------------------------------------------------- summaries


def test_metrics_that_do_not_apply_are_left_out_of_means_and_differences():
    nan = math.nan
    base = evaluation.Generation("base", ["p"] * 4, [0, 1, 2, 3], scores=[{"m": v, "s": s} for v, s in ((0, nan), (0, 1), (1, 0), (0, nan))])
    lora = evaluation.Generation("lora", ["p"] * 4, [0, 1, 2, 3], scores=[{"m": v, "s": s} for v, s in ((1, 1), (1, 1), (1, nan), (0, nan))])
    summary = evaluation.summarize({"base": base, "lora": lora}, "base")
    assert summary["base"]["s"]["mean"] == 0.5 and summary["base"]["s"]["n"] == 2
    assert summary["lora"]["s"]["mean"] == 1.0 and summary["lora"]["s"]["n"] == 2
    # paired only where both apply: image 1 (1 vs 1)
    assert summary["lora"]["s"]["difference_to_base"]["mean"] == 0.0
    assert summary["lora"]["m"]["difference_to_base"]["mean"] == 0.5
    table = evaluation.markdown_table(summary, "base", ["m", "s"])
    assert table.splitlines()[0] == "| model | m | s |" and "Δ +0.5000" in table

    scores = [{"blip_vqa": 0.4, "spatial": nan, "clip_score": 0.3}, {"blip_vqa": 0.4, "spatial": 1.0, "clip_score": 0.1}]
    add_three_in_one(scores)
    assert scores[0]["three_in_one"] == pytest.approx(0.35) and scores[1]["three_in_one"] == pytest.approx(0.5)
