"""Concept Matching: the caption loss is the token NLL of the prompt under BLIP, and it reaches the pixels."""

import pytest
import torch

from utils.concept_matching import CaptionScorer, caption_nll
from utils.model_loading import ModelLoadError


@pytest.fixture(scope="module")
def scorer(tiny_blip_path):
    return CaptionScorer.from_pretrained(tiny_blip_path, prefix="a photography of")


def test_tokens_start_with_dec_and_prefix_and_padding_are_not_targets(scorer):
    input_ids, attention_mask, labels = scorer.tokenize(["A red book", "a red book and a yellow vase"])
    tok = scorer.tokenizer
    assert (input_ids[:, 0] == tok.convert_tokens_to_ids("[DEC]")).all()
    prefix_ids = tok("a photography of", add_special_tokens=False).input_ids
    assert input_ids[0, 1 : 1 + len(prefix_ids)].tolist() == prefix_ids
    assert (labels[:, : 1 + len(prefix_ids)] == -100).all()
    first = tok("a red book", add_special_tokens=False).input_ids + [tok.sep_token_id]
    assert labels[0][labels[0] != -100].tolist() == first  # lower-cased prompt + [SEP]; padding ignored
    assert (labels[0][attention_mask[0] == 0] == -100).all() and (attention_mask[0] == 0).any()


def test_caption_loss_equals_hand_computed_token_nll(scorer):
    torch.manual_seed(0)
    images = torch.rand(1, 3, 32, 32)
    tok = scorer.tokenizer
    prefix = tok("a photography of", add_special_tokens=False).input_ids
    prompt = tok("a red book", add_special_tokens=False).input_ids
    ids = torch.tensor([[tok.convert_tokens_to_ids("[DEC]")] + prefix + prompt + [tok.sep_token_id]])
    pixel_values = scorer.preprocess(images)
    logits = scorer.model(pixel_values=pixel_values, input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
    log_probs = logits.log_softmax(-1)
    nll, smoothed = [], []
    for position in range(len(prefix) + 1, ids.shape[1]):  # targets: the prompt tokens and [SEP]
        target = ids[0, position]
        nll.append(-log_probs[position - 1, target])
        smoothed.append(0.9 * nll[-1] - 0.1 * log_probs[position - 1].mean())
    assert len(nll) == len(prompt) + 1
    torch.testing.assert_close(scorer.loss(images, ["A red book"], reduction="sum"), torch.stack(nll).sum())
    torch.testing.assert_close(scorer.loss(images, ["a red book"], reduction="mean"), torch.stack(smoothed).mean())


def test_caption_loss_gradient_reaches_the_pixels(scorer):
    images = torch.rand(2, 3, 48, 48, requires_grad=True)
    loss = scorer.loss(images, ["a red book", "two cats"], crop_generator=torch.Generator().manual_seed(0), max_crop=2)
    loss.backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in scorer.model.parameters())


def test_sum_reduction_matches_per_sample_logprob_sum():
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[-100, 1, 2, -100], [-100, 3, -100, -100]])
    expected = (-(logits[0, 0].log_softmax(-1)[1] + logits[0, 1].log_softmax(-1)[2]) - logits[1, 0].log_softmax(-1)[3]) / 2
    torch.testing.assert_close(caption_nll(logits, labels, "sum"), expected)
    per_sample = torch.stack([-(logits[0, 0].log_softmax(-1)[1] + logits[0, 1].log_softmax(-1)[2]), -logits[1, 0].log_softmax(-1)[3]])
    torch.testing.assert_close(caption_nll(logits, labels, "none"), per_sample)


def test_unknown_reduction_names_the_flag(scorer):
    with pytest.raises(ValueError, match="--caption_loss_reduction"):
        scorer.loss(torch.rand(1, 3, 32, 32), ["a cat"], reduction="max")


def test_unreachable_caption_model_names_the_flag(tmp_path):
    with pytest.raises(ModelLoadError, match="--caption_model_name_or_path"):
        CaptionScorer.from_pretrained("Salesforce/blip-image-captioning-large", cache_dir=str(tmp_path))
