"""Grounded-SAM masks: tiny random GroundingDINO and SAM loaded with ``from_pretrained``, and the pure geometry.

Random detectors find random things, so the end-to-end tests force detections with the thresholds (``box_threshold=0``
keeps every query, ``text_threshold=0`` lets every query name a noun) instead of hoping for them.
"""

import os
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, BertTokenizer

from utils import grounded_segmentation, tiny_models
from utils.grounded_segmentation import (
    GroundedSegmenter,
    assign_boxes_to_phrases,
    build_grounding_caption,
    grounding_dino_pixel_values,
    normalized_cxcywh_to_xyxy,
    sam_logits_to_masks,
    sam_pixel_values,
    token_phrase_indices,
    union_masks_by_index,
)

# not square, so the aspect-keeping resizes and SAM's padding are exercised
HEIGHT, WIDTH = 24, 40
NOUNS = [["cat", "hippopotamus"], [], ["Dog", "teddy bear", "dog"]]


@pytest.fixture(scope="module")
def detect_everything(tiny_grounding_dino_path, tiny_sam_path):
    return GroundedSegmenter.from_pretrained(tiny_grounding_dino_path, tiny_sam_path, box_threshold=0.0, text_threshold=0.0)


@pytest.fixture(scope="module")
def images():
    generator = torch.Generator().manual_seed(0)
    return torch.rand(len(NOUNS), 3, HEIGHT, WIDTH, generator=generator)


@pytest.fixture(scope="module")
def bert_tokenizer():
    return BertTokenizer(vocab=tiny_models.bert_vocab_file(), do_lower_case=True)


def smooth_image(height, width):
    """A gradient image, on which the processors' uint8 PIL path and the torch path agree closely."""
    rows, columns = torch.meshgrid(torch.linspace(0, 1, height), torch.linspace(0, 1, width), indexing="ij")
    image = torch.stack([columns, rows, (rows + columns) / 2])
    return image, (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def test_models_are_frozen(detect_everything):
    for model in (detect_everything.grounding_model, detect_everything.sam_model):
        assert not model.training
        assert not any(parameter.requires_grad for parameter in model.parameters())


def test_one_mask_per_noun_for_a_batch(detect_everything, images):
    masks = detect_everything(images.clone().requires_grad_(True), NOUNS, mask_size=(12, 20))

    assert [tuple(image_masks.shape) for image_masks in masks] == [(2, 12, 20), (0, 12, 20), (3, 12, 20)]
    for image_masks in masks:
        assert image_masks.dtype == torch.float32 and not image_masks.requires_grad
        assert set(image_masks.unique().tolist()) <= {0.0, 1.0}
    # every query is a box of some noun, so each image with nouns has some foreground
    assert masks[0].sum() > 0 and masks[2].sum() > 0
    # "Dog" and "dog" are one phrase of the caption
    torch.testing.assert_close(masks[2][0], masks[2][2])

    full_size = detect_everything(images, NOUNS)
    assert [tuple(image_masks.shape) for image_masks in full_size] == [
        (2, HEIGHT, WIDTH),
        (0, HEIGHT, WIDTH),
        (3, HEIGHT, WIDTH),
    ]


def test_batch_gives_the_masks_of_images_one_by_one(detect_everything, images):
    # the captions differ in length, so the batch exercises the text padding and its attention mask
    batched = detect_everything(images, NOUNS)
    for image, image_nouns, batch_masks in zip(images, NOUNS, batched):
        torch.testing.assert_close(detect_everything(image[None], [image_nouns])[0], batch_masks)


def test_sam_masks_of_a_batch_match_images_one_by_one(detect_everything, images):
    # the images have different numbers of boxes, and each box must be decoded with its own image's embedding
    boxes = [torch.tensor([[0.5, 0.5, 0.6, 0.4]]), torch.tensor([[0.3, 0.4, 0.2, 0.5], [0.7, 0.5, 0.5, 0.9]])]
    together = detect_everything._segment(images[:2], boxes, (HEIGHT, WIDTH))
    for image, image_boxes, image_masks in zip(images[:2], boxes, together):
        assert image_masks.shape == (len(image_boxes), HEIGHT, WIDTH)
        torch.testing.assert_close(
            detect_everything._segment(image[None], [image_boxes], (HEIGHT, WIDTH))[0], image_masks
        )


def test_sam_chunks_give_the_masks_of_one_call(detect_everything, images, monkeypatch):
    boxes = [torch.tensor([[0.5, 0.5, 0.6, 0.4], [0.2, 0.2, 0.3, 0.3]]), torch.tensor([[0.3, 0.4, 0.2, 0.5], [0.7, 0.5, 0.5, 0.9]])]
    one_call = detect_everything._segment(images[:2], boxes, (HEIGHT, WIDTH))
    monkeypatch.setattr(grounded_segmentation, "SAM_BOXES_PER_CALL", 3)
    chunked = detect_everything._segment(images[:2], boxes, (HEIGHT, WIDTH))
    for a, b in zip(one_call, chunked):
        torch.testing.assert_close(a, b)


def test_box_threshold_above_one_finds_nothing(tiny_grounding_dino_path, tiny_sam_path, images):
    segmenter = GroundedSegmenter.from_pretrained(
        tiny_grounding_dino_path, tiny_sam_path, box_threshold=1.01, text_threshold=0.0
    )
    masks = segmenter(images, NOUNS, mask_size=(8, 8))
    assert [tuple(image_masks.shape) for image_masks in masks] == [(2, 8, 8), (0, 8, 8), (3, 8, 8)]
    assert all(not image_masks.any() for image_masks in masks)


def test_images_without_nouns(detect_everything, images):
    masks = detect_everything(images[:2], [[], [" "]], mask_size=(4, 6))
    assert [tuple(image_masks.shape) for image_masks in masks] == [(0, 4, 6), (1, 4, 6)]
    assert not masks[1].any()


def test_caption_joins_distinct_nouns_lower_cased():
    caption = build_grounding_caption(["Cat", "teddy bear ", "", "cat"])
    assert caption.text == "cat . teddy bear ."
    assert [caption.text[start:end] for start, end in caption.phrase_spans] == ["cat", "teddy bear"]
    assert caption.phrase_of_noun == [0, 1, -1, 0]


def test_tokens_of_multi_token_nouns_belong_to_their_noun(bert_tokenizer):
    caption = build_grounding_caption(["cat", "hippopotamus", "teddy bear"])
    encoding = bert_tokenizer(caption.text, return_offsets_mapping=True, return_tensors="pt")
    tokens = bert_tokenizer.convert_ids_to_tokens(encoding.input_ids[0])
    assert tokens == ["[CLS]", "cat", ".", "hip", "##pop", "##ota", "##mus", ".", "teddy", "bear", ".", "[SEP]"]
    token_phrase = token_phrase_indices(encoding.offset_mapping[0], caption.phrase_spans)
    assert token_phrase.tolist() == [-1, 0, -1, 1, 1, 1, 1, -1, 2, 2, -1, -1]


def test_boxes_go_to_the_noun_of_their_best_token():
    #                           [CLS] cat   .    hip  ##pop ##ota ##mus  .   [SEP]
    token_phrase = torch.tensor([-1, 0, -1, 1, 1, 1, 1, -1, -1])
    token_scores = torch.tensor(
        [
            [0.1, 0.40, 0.1, 0.35, 0.2, 0.90, 0.3, 0.1, 0.1],  # inner word piece of the multi-token noun wins
            [0.1, 0.80, 0.95, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1],  # a separator scores highest but names no noun
            [0.2, 0.20, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1],  # below box_threshold
            [0.1, 0.10, 0.1, 0.2, 0.1, 0.1, 0.1, 0.1, 0.5],  # kept, but no noun token above text_threshold
            [0.1, 0.30, 0.1, 0.26, 0.28, 0.1, 0.1, 0.1, 0.1],  # "cat" beats the hippo's pieces
        ]
    )
    phrases = assign_boxes_to_phrases(token_scores[None], token_phrase[None], box_threshold=0.29, text_threshold=0.25)
    assert phrases.tolist() == [[1, 0, -1, -1, 0]]


def test_masks_of_one_noun_are_ored():
    masks = torch.zeros(3, 4, 4, dtype=torch.bool)
    masks[0, :2, :2] = True
    masks[1, 1:3, 1:3] = True
    masks[2, 3, 3] = True
    union = union_masks_by_index(masks, torch.tensor([1, 1, 0]), count=3)

    assert union.dtype == torch.float32 and union.shape == (3, 4, 4)
    torch.testing.assert_close(union[1], (masks[0] | masks[1]).float())
    torch.testing.assert_close(union[0], masks[2].float())
    assert not union[2].any()  # a noun without boxes


def test_normalized_boxes_to_sam_pixel_corners():
    boxes = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.1, 0.9, 0.4, 0.4]])
    corners = normalized_cxcywh_to_xyxy(boxes, height=19, width=32)
    # the second box sticks out at the left and the bottom and is clipped to the frame
    torch.testing.assert_close(corners, torch.tensor([[8.0, 4.75, 24.0, 14.25], [0.0, 13.3, 9.6, 19.0]]))


@pytest.mark.parametrize("size", [(HEIGHT, WIDTH), (WIDTH, HEIGHT), (33, 17)])
def test_pixel_values_match_the_processors(tiny_grounding_dino_path, tiny_sam_path, size):
    image, image_uint8 = smooth_image(*size)

    sam_processor = AutoProcessor.from_pretrained(tiny_sam_path, backend="pil")
    expected = sam_processor(images=image_uint8, return_tensors="pt")
    pixel_values, resized_size = sam_pixel_values(image[None], sam_processor.image_processor)
    assert resized_size == tuple(expected.reshaped_input_sizes[0].tolist())
    assert pixel_values.shape == expected.pixel_values.shape
    # uint8 rounding and PIL's resampling differ from the float torch path by a few hundredths
    torch.testing.assert_close(pixel_values, expected.pixel_values, atol=0.05, rtol=0)

    grounding_processor = AutoProcessor.from_pretrained(tiny_grounding_dino_path, backend="pil")
    expected = grounding_processor.image_processor(images=image_uint8, return_tensors="pt")
    pixel_values = grounding_dino_pixel_values(image[None], grounding_processor.image_processor)
    assert pixel_values.shape == expected.pixel_values.shape
    torch.testing.assert_close(pixel_values, expected.pixel_values, atol=0.05, rtol=0)


def test_mask_upsampling_matches_sam_post_processing(tiny_sam_path):
    sam_processor = AutoProcessor.from_pretrained(tiny_sam_path, backend="pil")
    low_res_logits = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(0))
    resized_size = (19, 32)  # a 24 x 40 image in SAM's 32 x 32 input
    expected = sam_processor.post_process_masks(low_res_logits[None, :, None], [(HEIGHT, WIDTH)], [resized_size])[0]
    masks = sam_logits_to_masks(low_res_logits, (32, 32), resized_size, (HEIGHT, WIDTH))
    assert torch.equal(masks, expected[:, 0])


@pytest.mark.parametrize("broken", ["hub id offline", "missing folder", "folder without processor"])
def test_unloadable_model_names_its_flag(tiny_grounding_dino_path, tiny_sam_path, tmp_path, broken):
    if broken == "hub id offline":
        paths, flag = ("no-such-org/no-such-model", tiny_sam_path), "--grounding_model_name_or_path"
    elif broken == "missing folder":
        paths, flag = (tiny_grounding_dino_path, str(tmp_path / "missing")), "--sam_model_name_or_path"
    else:
        for name in ("config.json", "model.safetensors"):
            shutil.copy(os.path.join(tiny_sam_path, name), tmp_path / name)
        paths, flag = (tiny_grounding_dino_path, str(tmp_path)), "--sam_model_name_or_path"
    with pytest.raises(OSError, match=flag) as error:
        GroundedSegmenter.from_pretrained(*paths)
    assert "local folder" in str(error.value) and error.value.__cause__ is not None


def test_model_of_another_architecture_is_refused(tiny_grounding_dino_path):
    with pytest.raises(ValueError, match="--sam_model_name_or_path .* 'grounding-dino' model; expected 'sam'"):
        GroundedSegmenter.from_pretrained(tiny_grounding_dino_path, tiny_grounding_dino_path)
