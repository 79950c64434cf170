"""Concept Matching: a frozen image-captioning model scores how likely the prompt is given the image.

``L_cap = −log p_C(P | I)``: the generated image (in [0, 1], with gradient) goes through a
differentiable resize and normalisation into a frozen BLIP captioner, which is teacher-forced on
``prefix + prompt``. Tokens the model fails to "see" in the image are expensive, so the gradient
pushes the generator to draw every concept of the prompt.

Details that matter (see ``comat_method.md``):

* No PIL round trip: bicubic, antialiased ``F.interpolate`` to the captioner's input size, then
  the processor's mean/std. A small random crop (≤ resolution // 224 px per side) is the recipe's
  augmentation.
* BLIP's ``generate`` starts the caption with its BOS token ``[DEC]``, while a plain ``forward``
  of tokenizer output keeps ``[CLS]`` in position 0. We score with ``[DEC]``, the start token the
  captioner was trained and decodes with.
* The prefix (recipe: "a photography of") and padding are excluded from the loss.
* ``reduction="mean"`` (recipe, = transformers' captioning loss): next-token cross-entropy with
  label smoothing 0.1, averaged over all target tokens of the batch. ``reduction="sum"``: the
  paper's formula, −Σ_i log p(w_i | I, w_<i) per sample (no smoothing), averaged over the batch.
"""

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from .differentiable_sampling import check_unit_range
from .model_loading import import_factory, load_pretrained

CAPTION_REDUCTIONS = ("mean", "sum")
LABEL_SMOOTHING = 0.1


def load_caption_scorer(args, dtype):
    """The scorer of Concept Matching: the BLIP captioner of ``--caption_model_name_or_path`` (the default), or what
    ``--caption_scorer MODULE:NAME`` names.

    A caption scorer is any object with ``to(device)`` and ``loss(images, prompts, reduction, crop_generator,
    max_crop)`` that returns a scalar fp32 loss, differentiable in ``images`` ``[B, 3, H, W]`` in [0, 1], lower when
    the images show their prompts better (``reduction``: ``--caption_loss_reduction``; ``crop_generator`` and
    ``max_crop``: the recipe's random crop, free to ignore). The loss must stay connected to the images even where it
    has no signal (add ``0 * images.sum()``): training refuses one that is not. ``--caption_scorer`` names a factory
    ``NAME(args, dtype)`` in an importable ``MODULE`` that returns one; :class:`CaptionScorer` is the default's.
    """
    if args.caption_scorer is None:
        return CaptionScorer.from_pretrained(
            args.caption_model_name_or_path, prefix=args.caption_prefix, dtype=dtype, cache_dir=args.cache_dir
        )
    return import_factory("--caption_scorer", args.caption_scorer, "NAME(args, dtype)")(args, dtype)


class CaptionScorer:
    """A frozen BLIP captioner that turns (image, prompt) pairs into the Concept Matching loss."""

    def __init__(self, model, tokenizer, image_size, image_mean, image_std, prefix="a photography of"):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.prefix = prefix.strip()
        self.image_mean = torch.tensor(image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.image_std = torch.tensor(image_std, dtype=torch.float32).view(1, 3, 1, 1)
        self.start_token_id = model.config.text_config.bos_token_id

    @classmethod
    def from_pretrained(cls, name_or_path, prefix="a photography of", dtype=torch.float32, cache_dir=None):
        from transformers import AutoProcessor, BlipForConditionalGeneration

        flag = "--caption_model_name_or_path"
        processor = load_pretrained(AutoProcessor, name_or_path, flag, cache_dir=cache_dir)
        model = load_pretrained(BlipForConditionalGeneration, name_or_path, flag, cache_dir=cache_dir, dtype=dtype)
        image_processor = processor.image_processor
        size = image_processor.size
        image_size = (size["height"], size["width"]) if "height" in size else (size["shortest_edge"],) * 2
        return cls(model, processor.tokenizer, image_size, image_processor.image_mean, image_processor.image_std, prefix)

    def to(self, device):
        self.model.to(device)
        return self

    @property
    def device(self):
        return self.model.device

    def preprocess(self, images: torch.Tensor, crop_generator: Optional[torch.Generator] = None, max_crop: int = 0):
        """Differentiable: images [B, 3, H, W] in [0, 1] → normalised pixel values at the captioner's size."""
        check_unit_range(images, "The captioner")
        if max_crop > 0:
            # One random crop for the batch keeps the op a single slice (cheap, still differentiable).
            top, left, bottom, right = torch.randint(0, max_crop + 1, (4,), generator=crop_generator).tolist()
            height, width = images.shape[-2:]
            images = images[..., top : height - bottom, left : width - right]
        images = F.interpolate(images.float(), size=self.image_size, mode="bicubic", align_corners=False, antialias=True)
        mean, std = self.image_mean.to(images.device), self.image_std.to(images.device)
        return ((images - mean) / std).to(self.model.dtype)

    def tokenize(self, prompts: Sequence[str]):
        """Token ids that start with ``[DEC]``, and labels with the start token, prefix and padding set to -100."""
        texts = [f"{self.prefix} {prompt.strip().lower()}".strip() for prompt in prompts]
        max_length = self.model.config.text_config.max_position_embeddings
        encoded = self.tokenizer(texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
        input_ids = encoded.input_ids.clone()
        input_ids[:, 0] = self.start_token_id
        labels = input_ids.masked_fill(encoded.attention_mask == 0, -100)
        # [start] + prefix tokens are context, not targets (the tokenizer adds no special token to the prefix).
        num_context = 1 + len(self.tokenizer(self.prefix, add_special_tokens=False).input_ids) if self.prefix else 1
        labels[:, :num_context] = -100
        return input_ids, encoded.attention_mask, labels

    def loss(
        self,
        images: torch.Tensor,
        prompts: Sequence[str],
        reduction: str = "mean",
        crop_generator: Optional[torch.Generator] = None,
        max_crop: int = 0,
    ) -> torch.Tensor:
        """The Concept Matching loss of images [B, 3, H, W] in [0, 1] for their prompts (scalar, fp32)."""
        if reduction not in CAPTION_REDUCTIONS:
            raise ValueError(f"--caption_loss_reduction must be one of {CAPTION_REDUCTIONS}, got {reduction!r}.")
        pixel_values = self.preprocess(images, crop_generator, max_crop)
        input_ids, attention_mask, labels = (t.to(pixel_values.device) for t in self.tokenize(prompts))
        logits = self.model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask).logits
        return caption_nll(logits, labels, reduction)


def caption_nll(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token negative log-likelihood of ``labels`` (−100 = ignored) under ``logits`` [B, L, V].

    ``mean``: label-smoothed (0.1) cross-entropy averaged over all target tokens of the batch (the recipe).
    ``sum``: −Σ log p per sample, averaged over the batch (the paper's formula).
    ``none``: −Σ log p of each sample, ``[B]``.
    """
    shifted_logits = logits[:, :-1].float()
    targets = labels[:, 1:]
    if reduction == "mean":
        return F.cross_entropy(
            shifted_logits.reshape(-1, shifted_logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=-100,
            label_smoothing=LABEL_SMOOTHING,
        )
    token_nll = F.cross_entropy(shifted_logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
    per_sample = token_nll.sum(dim=1)
    return per_sample if reduction == "none" else per_sample.mean()
