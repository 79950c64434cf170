"""Alignment scorers of real models: the metrics T2I-CompBench, GenEval and the CoMat paper report.

Each scorer fits ``utils.evaluation.Scorer``: ``score(images, prompts)`` takes RGB uint8 arrays ``[H, W, 3]`` and
returns one dict of metrics per image. A metric that does not apply to a prompt (a spatial score for a prompt
without a relation) is NaN; ``utils.evaluation.summarize`` leaves it out.

* :class:`BlipVqaScorer` — ``blip_vqa``, attribute binding as T2I-CompBench scores it: every object phrase of the
  prompt ("a red book") becomes the question "a red book?" for ``BlipForQuestionAnswering``; the score is the
  product over questions of P("yes"), the probability of the first answer token "yes" against "no". Phrases come
  from the project's entity extraction (``utils.entities``, every noun with its attributes).
* :class:`DetectionScorer` — GroundingDINO boxes of the prompt's objects: ``spatial`` (1 when the relation the prompt
  names holds between the two objects' most confident boxes, see :data:`RELATION_RULES`; 0 when it does not or an
  object is missing), ``objects_present`` (1 when every object has a box; GenEval) and ``counting`` (1 when every
  counted object, "three cats", has that many boxes after non-maximum suppression; GenEval).
* :class:`ClipScorer` — ``clip_score``, the cosine similarity of CLIP's image and prompt embeddings (T2I-CompBench's
  non-spatial metric).

:data:`CATEGORY_METRICS` maps each evaluation category (``utils.eval_prompts``) to the scorers it needs;
``three_in_one`` (T2I-CompBench's complex metric) is the mean of a complex prompt's applicable scores.
"""

import math
import re
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .entities import extract_entities, load_spacy_model
from .evaluation import score
from .grounded_segmentation import build_grounding_caption, detect_phrase_boxes, load_frozen, normalized_cxcywh_to_xyxy

# Scorer name -> the metrics it writes.
SCORER_METRICS = {
    "blip_vqa": ("blip_vqa",),
    "detection": ("spatial", "objects_present", "counting"),
    "clip": ("clip_score",),
}
# Category -> the scorers it runs; a prompt file of no known category runs them all.
CATEGORY_SCORERS = {
    "color": ("blip_vqa",),
    "shape": ("blip_vqa",),
    "texture": ("blip_vqa",),
    "spatial": ("detection",),
    "non_spatial": ("clip",),
    "complex": ("blip_vqa", "detection", "clip"),
}
# Category -> the metric its table leads with (T2I-CompBench's choice for the category).
CATEGORY_METRICS = {
    "color": "blip_vqa",
    "shape": "blip_vqa",
    "texture": "blip_vqa",
    "spatial": "spatial",
    "non_spatial": "clip_score",
    "complex": "three_in_one",
}

# Relation phrase -> rule on the two objects' box centres (x right, y down, in image fractions).
# "in front of" / "behind" need depth and are not scored.
RELATION_RULES = {
    "on the left of": lambda dx, dy: dx < 0,
    "to the left of": lambda dx, dy: dx < 0,
    "left of": lambda dx, dy: dx < 0,
    "on the right of": lambda dx, dy: dx > 0,
    "to the right of": lambda dx, dy: dx > 0,
    "right of": lambda dx, dy: dx > 0,
    "on top of": lambda dx, dy: dy < 0,
    "above": lambda dx, dy: dy < 0,
    "over": lambda dx, dy: dy < 0,
    "below": lambda dx, dy: dy > 0,
    "under": lambda dx, dy: dy > 0,
    "beneath": lambda dx, dy: dy > 0,
    "underneath": lambda dx, dy: dy > 0,
    # Side by side: further apart horizontally than vertically.
    "next to": lambda dx, dy: abs(dx) >= abs(dy),
    "beside": lambda dx, dy: abs(dx) >= abs(dy),
    "on the side of": lambda dx, dy: abs(dx) >= abs(dy),
    # Both objects in one image is all that 2-D boxes can say about "near".
    "near": lambda dx, dy: True,
}
NUMBER_WORDS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10}
# Boxes of one object overlapping more than this are one detection (non-maximum suppression).
NMS_IOU = 0.5


def _images_to_tensor(images: Sequence[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255


def _batches(count, batch_size, description, show_progress):
    return tqdm(range(0, count, batch_size), desc=description, disable=not show_progress)


# ------------------------------------------------------------------------------------------------ BLIP-VQA


def yes_probability_product(yes_probabilities: Sequence[float]) -> float:
    """T2I-CompBench's BLIP-VQA score of one image: the product of its questions' P("yes"); 1 without questions."""
    return float(np.prod(yes_probabilities)) if len(yes_probabilities) else 1.0


def _word_before(prompt: str, start: int):
    """The match of the word just before character ``start`` (its text: ``group(1)``), or None."""
    return re.search(r"(\w+)\s+$", prompt[:start])


def object_span(entity) -> tuple[int, int]:
    """Character span of an object in its prompt: from its first attribute before the noun to the noun (attributes
    after it, "the dog is red", are elsewhere in the sentence)."""
    noun_start, noun_end = entity.noun_char_span
    return min(start for start, _ in entity.char_spans if start <= noun_start), noun_end


def object_phrases(prompt: str, nlp) -> list[str]:
    """The prompt's object phrases (article or number, attributes, noun: "a red book", "three cats"), in order."""
    phrases = []
    for entity in extract_entities(prompt, nlp, attend_all_nouns=True):
        start, end = object_span(entity)
        before = _word_before(prompt, start)
        if before and (before.group(1).lower() in ("a", "an", "the") or before.group(1).lower() in NUMBER_WORDS):
            start = before.start(1)
        phrases.append(prompt[start:end])
    return phrases


class BlipVqaScorer:
    """``blip_vqa``: T2I-CompBench's attribute-binding score with ``BlipForQuestionAnswering`` (see the module docstring).

    Args:
        model: the VQA model; processor: its processor (tokenizer and image-processor config); nlp: a spaCy pipeline.
    """

    name = "blip_vqa"
    metrics = SCORER_METRICS["blip_vqa"]

    def __init__(self, model, processor, nlp, batch_size=32, show_progress=True):
        self.model, self.processor, self.nlp = model, processor, nlp
        self.batch_size, self.show_progress = batch_size, show_progress
        tokenizer = processor.tokenizer
        self.answer_ids = [tokenizer.convert_tokens_to_ids(answer) for answer in ("yes", "no")]
        if tokenizer.unk_token_id in self.answer_ids:
            raise ValueError("The BLIP-VQA tokenizer has no single token for 'yes' or 'no'.")

    @classmethod
    def from_pretrained(cls, name_or_path, device="cpu", dtype=torch.float32, spacy_model="en_core_web_sm", flag="--blip_vqa_model", **kwargs):
        from transformers import BlipForQuestionAnswering

        model, processor = load_frozen(BlipForQuestionAnswering, name_or_path, flag, device, dtype)
        return cls(model, processor, load_spacy_model(spacy_model), **kwargs)

    @torch.no_grad()
    def yes_probabilities(self, images: Sequence[np.ndarray], questions: Sequence[str]) -> torch.Tensor:
        """P("yes") against "no" for each (image, question) pair: the first answer token's two logits.

        Questions run in groups of one token length, unpadded: BLIP's answer decoder in transformers 5 drops the
        question's padding mask in its cross-attention (``BlipTextLayer`` passes it as ``attention_mask``, which
        the attention replaces by ``encoder_attention_mask``), so a padded question would be answered differently."""
        model = self.model
        pixels = self.processor.image_processor(list(images), return_tensors="pt").pixel_values
        token_ids = self.processor.tokenizer(list(questions)).input_ids
        probabilities = torch.empty(len(questions))
        for length in sorted({len(ids) for ids in token_ids}):
            group = [index for index, ids in enumerate(token_ids) if len(ids) == length]
            input_ids = torch.tensor([token_ids[index] for index in group], device=model.device)
            image_embeds = model.vision_model(pixel_values=pixels[group].to(model.device, model.dtype))[0]
            question_embeds = model.text_encoder(
                input_ids=input_ids, encoder_hidden_states=image_embeds,
                encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=model.device),
            )[0]
            start = torch.full((len(group), 1), model.decoder_start_token_id, device=model.device)
            logits = model.text_decoder(input_ids=start, encoder_hidden_states=question_embeds).logits[:, -1]
            probabilities[group] = logits[:, self.answer_ids].float().softmax(dim=-1)[:, 0].cpu()
        return probabilities

    def score(self, images, prompts):
        questions = [[phrase + "?" for phrase in object_phrases(prompt, self.nlp)] for prompt in prompts]
        pairs = [(index, question) for index, image_questions in enumerate(questions) for question in image_questions]
        probabilities = [[] for _ in prompts]
        for start in _batches(len(pairs), self.batch_size, "Scoring (BLIP-VQA)", self.show_progress):
            batch = pairs[start : start + self.batch_size]
            values = self.yes_probabilities([images[index] for index, _ in batch], [question for _, question in batch])
            for (index, _), value in zip(batch, values.tolist()):
                probabilities[index].append(value)
        return [{"blip_vqa": yes_probability_product(values)} for values in probabilities]


# ------------------------------------------------------------------------------------------------ detection


def find_relation(prompt: str, object_spans: Sequence[tuple[int, int]]) -> tuple[int, str, int] | None:
    """The first relation of :data:`RELATION_RULES` in ``prompt`` with the objects around it: ``(subject index,
    relation, object index)`` — the last object before the phrase and the first after it — or None."""
    lowered = prompt.lower()
    found = None
    for relation in RELATION_RULES:
        match = re.search(rf"\b{re.escape(relation)}\b", lowered)
        # the earliest phrase wins; at one position the longest ("on the left of" over "left of")
        if match and (found is None or (match.start(), -len(relation)) < (found[0], -len(found[1]))):
            found = (match.start(), relation, match.end())
    if found is None:
        return None
    start, relation, end = found
    before = [index for index, (_, span_end) in enumerate(object_spans) if span_end <= start]
    after = [index for index, (span_start, _) in enumerate(object_spans) if span_start >= end]
    if not before or not after:
        return None
    return before[-1], relation, after[0]


def relation_holds(relation: str, subject_box: Sequence[float], object_box: Sequence[float]) -> bool:
    """Whether ``relation`` holds from the subject's box to the object's (``x0, y0, x1, y1``, y down)."""
    dx = (subject_box[0] + subject_box[2]) / 2 - (object_box[0] + object_box[2]) / 2
    dy = (subject_box[1] + subject_box[3]) / 2 - (object_box[1] + object_box[3]) / 2
    return bool(RELATION_RULES[relation](dx, dy))


def box_iou(boxes_a: torch.Tensor, boxes_b: torch.Tensor) -> torch.Tensor:
    """``[A, B]`` intersection over union of ``x0, y0, x1, y1`` boxes."""
    top_left = torch.maximum(boxes_a[:, None, :2], boxes_b[None, :, :2])
    bottom_right = torch.minimum(boxes_a[:, None, 2:], boxes_b[None, :, 2:])
    intersection = (bottom_right - top_left).clamp_min(0).prod(dim=-1)
    area_a = (boxes_a[:, 2:] - boxes_a[:, :2]).clamp_min(0).prod(dim=-1)
    area_b = (boxes_b[:, 2:] - boxes_b[:, :2]).clamp_min(0).prod(dim=-1)
    return intersection / (area_a[:, None] + area_b[None, :] - intersection).clamp_min(1e-12)


def non_maximum_suppression(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float = NMS_IOU) -> torch.Tensor:
    """Indices of the kept boxes, most confident first: a box overlapping a kept one by more than the threshold goes."""
    kept = []
    for index in scores.argsort(descending=True).tolist():
        if all(box_iou(boxes[index : index + 1], boxes[other : other + 1]).item() <= iou_threshold for other in kept):
            kept.append(index)
    return torch.tensor(kept, dtype=torch.long)


def counted_number(prompt: str, span_start: int) -> int | None:
    """The number written just before an object phrase ("three" in "three black cats"), or None."""
    before = _word_before(prompt, span_start)
    if before is None:
        return None
    word = before.group(1).lower()
    return int(word) if word.isdigit() else NUMBER_WORDS.get(word)


def detection_metrics(prompt, object_spans, detections) -> dict[str, float]:
    """``spatial``, ``objects_present`` and ``counting`` of one image from each object's kept boxes
    (``detections[i]``: ``[N_i, 4]`` ``x0, y0, x1, y1`` boxes, most confident first)."""
    nan = float("nan")
    if not object_spans:
        return {"spatial": nan, "objects_present": nan, "counting": nan}
    found = [len(boxes) > 0 for boxes in detections]
    relation = find_relation(prompt, object_spans)
    if relation is None:
        spatial = nan
    else:
        subject, phrase, obj = relation
        spatial = float(found[subject] and found[obj] and relation_holds(phrase, detections[subject][0].tolist(), detections[obj][0].tolist()))
    counts = [(counted_number(prompt, start), len(boxes)) for (start, _), boxes in zip(object_spans, detections)]
    counted = [(wanted, seen) for wanted, seen in counts if wanted is not None]
    counting = float(all(wanted == seen for wanted, seen in counted)) if counted else nan
    return {"spatial": spatial, "objects_present": float(all(found)), "counting": counting}


class DetectionScorer:
    """``spatial``, ``objects_present``, ``counting`` from GroundingDINO boxes (see the module docstring).

    Objects are the prompt's entities (every noun, ``utils.entities``); their spans run from the first attribute
    (or the number before it) to the noun, and the detector looks for each object's name ("traffic light")."""

    name = "detection"
    metrics = SCORER_METRICS["detection"]

    def __init__(self, model, processor, nlp, box_threshold=0.35, text_threshold=0.25, batch_size=16, show_progress=True):
        self.model, self.processor, self.nlp = model, processor, nlp
        self.box_threshold, self.text_threshold = box_threshold, text_threshold
        self.batch_size, self.show_progress = batch_size, show_progress

    @classmethod
    def from_pretrained(cls, name_or_path, device="cpu", dtype=torch.float32, spacy_model="en_core_web_sm", flag="--grounding_model", **kwargs):
        from transformers import GroundingDinoForObjectDetection

        model, processor = load_frozen(GroundingDinoForObjectDetection, name_or_path, flag, device, dtype)
        return cls(model, processor, load_spacy_model(spacy_model), **kwargs)

    def objects(self, prompt):
        """``(queries, spans)``: the name the detector looks for and the character span of each object."""
        entities = extract_entities(prompt, self.nlp, attend_all_nouns=True)
        spans = [object_span(entity) for entity in entities]
        return [entity.grounding_query for entity in entities], spans

    def detections(self, images, queries) -> list[list[torch.Tensor]]:
        """Per image, per query: its boxes after non-maximum suppression (``x0, y0, x1, y1`` in image fractions)."""
        captions = [build_grounding_caption(image_queries) for image_queries in queries]
        grounded = [index for index, caption in enumerate(captions) if caption.phrase_spans]
        results = [[torch.zeros(0, 4) for _ in image_queries] for image_queries in queries]
        if not grounded:
            return results
        pixels = _images_to_tensor([images[index] for index in grounded])
        box_phrases, boxes, scores = detect_phrase_boxes(
            self.model, self.processor.tokenizer, self.processor.image_processor, pixels,
            [captions[index] for index in grounded], self.box_threshold, self.text_threshold,
        )
        boxes = normalized_cxcywh_to_xyxy(boxes, 1, 1).cpu()
        box_phrases, scores = box_phrases.cpu(), scores.cpu()
        for row, index in enumerate(grounded):
            for query, phrase in enumerate(captions[index].phrase_of_noun):
                mine = (box_phrases[row] == phrase).nonzero().flatten()
                if phrase >= 0 and len(mine):
                    kept = mine[non_maximum_suppression(boxes[row, mine], scores[row, mine])]
                    results[index][query] = boxes[row, kept]
        return results

    @torch.no_grad()
    def score(self, images, prompts):
        objects = [self.objects(prompt) for prompt in prompts]
        results = []
        for start in _batches(len(prompts), self.batch_size, "Scoring (GroundingDINO)", self.show_progress):
            batch = range(start, min(start + self.batch_size, len(prompts)))
            detections = self.detections([images[i] for i in batch], [objects[i][0] for i in batch])
            results += [detection_metrics(prompts[i], objects[i][1], found) for i, found in zip(batch, detections)]
        return results


# ------------------------------------------------------------------------------------------------ CLIPScore


class ClipScorer:
    """``clip_score``: cosine similarity of CLIP's image and prompt embeddings (prompts truncated to CLIP's length)."""

    name = "clip"
    metrics = SCORER_METRICS["clip"]

    def __init__(self, model, processor, batch_size=32, show_progress=True):
        self.model, self.processor = model, processor
        self.batch_size, self.show_progress = batch_size, show_progress

    @classmethod
    def from_pretrained(cls, name_or_path, device="cpu", dtype=torch.float32, flag="--clip_model", **kwargs):
        from transformers import CLIPModel

        model, processor = load_frozen(CLIPModel, name_or_path, flag, device, dtype)
        return cls(model, processor, **kwargs)

    @staticmethod
    def _features(output):
        # transformers 5 returns the projected embedding as the output's pooler_output; earlier versions a tensor
        return F.normalize((output if torch.is_tensor(output) else output.pooler_output).float(), dim=-1)

    @torch.no_grad()
    def score(self, images, prompts):
        model, scores = self.model, []
        for start in _batches(len(prompts), self.batch_size, "Scoring (CLIPScore)", self.show_progress):
            batch = slice(start, start + self.batch_size)
            pixels = self.processor.image_processor(list(images[batch]), return_tensors="pt").pixel_values
            text = self.processor.tokenizer(
                list(prompts[batch]), padding=True, truncation=True, max_length=model.config.text_config.max_position_embeddings,
                return_tensors="pt",
            ).to(model.device)
            image_features = self._features(model.get_image_features(pixel_values=pixels.to(model.device, model.dtype)))
            text_features = self._features(model.get_text_features(input_ids=text.input_ids, attention_mask=text.attention_mask))
            scores += [{"clip_score": value} for value in (image_features * text_features).sum(dim=-1).tolist()]
        return scores


# ------------------------------------------------------------------------------------------------ categories


def add_three_in_one(scores: list[dict[str, float]]) -> None:
    """T2I-CompBench's complex metric: each image's mean of its applicable ``blip_vqa``, ``spatial`` and ``clip_score``."""
    for image_scores in scores:
        parts = [image_scores.get(name, math.nan) for name in ("blip_vqa", "spatial", "clip_score")]
        parts = [value for value in parts if math.isfinite(value)]
        image_scores["three_in_one"] = float(np.mean(parts)) if parts else math.nan


def scorers_for(category: str | None) -> tuple[str, ...]:
    """The scorers a prompt set needs: its category's, or all of them for a set of no known category."""
    return CATEGORY_SCORERS.get(category, tuple(SCORER_METRICS))


def load_scorers(names, *, blip_vqa_model, grounding_model, clip_model, spacy_model="en_core_web_sm", device="cpu",
                 dtype=torch.float32, box_threshold=0.35, text_threshold=0.25, show_progress=True, flags=None):
    """The named scorers (of :data:`SCORER_METRICS`), loaded frozen on ``device``; ``flags`` names the command-line
    flag of each model for error messages (default: the evaluate command's)."""
    flags = {"blip_vqa": "--blip_vqa_model", "detection": "--grounding_model", "clip": "--clip_model", **(flags or {})}
    common = dict(device=device, dtype=dtype, show_progress=show_progress)
    loaders = {
        "blip_vqa": lambda: BlipVqaScorer.from_pretrained(blip_vqa_model, spacy_model=spacy_model, flag=flags["blip_vqa"], **common),
        "detection": lambda: DetectionScorer.from_pretrained(
            grounding_model, spacy_model=spacy_model, flag=flags["detection"], box_threshold=box_threshold,
            text_threshold=text_threshold, **common,
        ),
        "clip": lambda: ClipScorer.from_pretrained(clip_model, flag=flags["clip"], **common),
    }
    return {name: loaders[name]() for name in names}


def score_category(generations, category, scorers) -> str | None:
    """Scores ``generations`` (``utils.evaluation``) with the scorers ``category`` needs (all loaded in ``scorers``)
    and returns the category's lead metric (None for a set of no known category)."""
    score(generations, [scorers[name] for name in scorers_for(category)])
    if category == "complex":
        for generation in generations.values():
            add_three_in_one(generation.scores)
    return CATEGORY_METRICS.get(category)
