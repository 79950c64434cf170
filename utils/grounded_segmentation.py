"""Grounded-SAM masks of a prompt's nouns on generated images (CoMat, Attribute Concentration, step 3).

GroundingDINO (``GroundingDinoForObjectDetection``) finds boxes for the nouns, SAM (``SamModel``) segments each box
with the box as its prompt, and the masks of the same noun are OR-ed into one mask per noun. Both models come from
transformers and are frozen; the images arrive as tensors in [0, 1] straight from the VAE, so all preprocessing is
done in torch with the values of the saved processor configs (no PIL round trip, no torchvision).

Per batch of images the segmenter runs one GroundingDINO forward (each image has its own caption; captions are padded
with the tokenizer and masked with its attention mask) and SAM once: its vision encoder on the images that have
boxes, then its prompt encoder and mask decoder on all boxes of the batch together, each box with its image's
embedding (SAM's own batching takes as many boxes for every image, which would mean padding; this does not).

Phrase → noun rule. The caption is the nouns joined as ``"noun1 . noun2 ."`` (lower-cased), the GroundingDINO
convention that makes each noun a phrase of its own. A query is kept as a box if its highest token score exceeds
``box_threshold``. Its phrase is the caption tokens whose score exceeds ``text_threshold``; the box is assigned to the
noun whose token span holds the highest-scoring of those tokens (separators and special tokens belong to no noun).
A noun split into several word pieces ("hip ##pop ##ota ##mus") owns all of them. A box with no such token in any
noun span is dropped. A noun that gets no box gets an all-zero mask.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoProcessor, GroundingDinoForObjectDetection, SamModel
from transformers.image_transforms import get_size_with_aspect_ratio

from .differentiable_sampling import check_unit_range
from .model_loading import import_factory

SAM_BOXES_PER_CALL = 64


@dataclass
class GroundingCaption:
    """A GroundingDINO caption built from nouns.

    Attributes:
        text: ``"noun1 . noun2 ."``, each distinct non-empty noun once, lower-cased.
        phrase_spans: character span ``(start, end)`` of each distinct noun (phrase) in ``text``.
        phrase_of_noun: for each given noun, the index of its phrase; -1 for an empty noun.
    """

    text: str
    phrase_spans: list[tuple[int, int]]
    phrase_of_noun: list[int]


def build_grounding_caption(nouns: list[str]) -> GroundingCaption:
    """Joins the nouns into a GroundingDINO caption; a noun given twice is one phrase, so both get the same mask."""
    text = ""
    phrase_spans = []
    phrase_index = {}
    phrase_of_noun = []
    for noun in nouns:
        phrase = noun.strip().lower()
        if not phrase:
            phrase_of_noun.append(-1)
            continue
        if phrase not in phrase_index:
            phrase_index[phrase] = len(phrase_spans)
            phrase_spans.append((len(text), len(text) + len(phrase)))
            text += phrase + " . "
        phrase_of_noun.append(phrase_index[phrase])
    return GroundingCaption(text.rstrip(), phrase_spans, phrase_of_noun)


def token_phrase_indices(offsets: torch.Tensor, phrase_spans: list[tuple[int, int]]) -> torch.Tensor:
    """The phrase each token belongs to, from the tokenizer's character offsets.

    Args:
        offsets: ``[T, 2]`` character ``(start, end)`` of each token; special and padding tokens have ``start == end``.
        phrase_spans: character span of each phrase in the caption.

    Returns:
        ``[T]`` long tensor: the index of the phrase whose span holds the token, -1 for tokens of no phrase.
    """
    starts, ends = offsets[:, 0], offsets[:, 1]
    token_phrase = torch.full((offsets.shape[0],), -1, dtype=torch.long, device=offsets.device)
    for phrase, (span_start, span_end) in enumerate(phrase_spans):
        inside = (starts >= span_start) & (ends <= span_end) & (ends > starts)
        token_phrase[inside] = phrase
    return token_phrase


def assign_boxes_to_phrases(
    token_scores: torch.Tensor, token_phrase: torch.Tensor, box_threshold: float, text_threshold: float
) -> torch.Tensor:
    """Which phrase each GroundingDINO query is a box of (see the module docstring for the rule).

    Args:
        token_scores: ``[..., Q, T]`` sigmoid scores of each query for each caption token.
        token_phrase: ``[..., T]`` phrase index of each token, -1 for tokens of no phrase.
        box_threshold: a query is a box if its highest token score is above this.
        text_threshold: tokens scoring above this form the box's phrase.

    Returns:
        ``[..., Q]`` long tensor: the phrase of each query, -1 for queries that are not kept.
    """
    token_phrase = token_phrase.unsqueeze(-2).expand_as(token_scores)
    in_phrase = (token_phrase >= 0) & (token_scores > text_threshold)
    phrase_token_scores = token_scores.masked_fill(~in_phrase, float("-inf"))
    best_score, best_token = phrase_token_scores.max(dim=-1)
    kept = (token_scores.max(dim=-1).values > box_threshold) & torch.isfinite(best_score)
    phrase = token_phrase.gather(-1, best_token.unsqueeze(-1)).squeeze(-1)
    return torch.where(kept, phrase, torch.full_like(phrase, -1))


def grounding_dino_resized_size(height: int, width: int, size) -> tuple[int, int]:
    """The size GroundingDINO's image processor resizes an image to, from its ``size`` config."""
    if size.get("shortest_edge") and size.get("longest_edge"):
        return get_size_with_aspect_ratio((height, width), size["shortest_edge"], size["longest_edge"])
    if size.get("height") and size.get("width"):
        return size["height"], size["width"]
    raise ValueError(f"GroundingDINO processor size must hold shortest_edge/longest_edge or height/width; got {size}.")


def sam_resized_size(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """The size SAM's image processor resizes an image to before padding: longest side to ``longest_edge``."""
    scale = longest_edge / max(height, width)
    # SAM rounds half up (``int(x + 0.5)``), not to even
    return int(height * scale + 0.5), int(width * scale + 0.5)


def normalized_cxcywh_to_xyxy(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """GroundingDINO's normalised ``(cx, cy, w, h)`` boxes to pixel corners ``(x0, y0, x1, y1)`` of a
    ``height x width`` frame (for SAM: the resized image inside its padded input), clipped to the frame."""
    center_x, center_y, box_width, box_height = boxes.unbind(-1)
    corners = torch.stack(
        [center_x - box_width / 2, center_y - box_height / 2, center_x + box_width / 2, center_y + box_height / 2],
        dim=-1,
    ).clamp(0, 1)
    return corners * corners.new_tensor([width, height, width, height])


def _resize_and_normalize(images: torch.Tensor, size: tuple[int, int], image_processor) -> torch.Tensor:
    # torchvision's resize, which transformers' image processors use, is bilinear and antialiased
    resized = F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
    mean = resized.new_tensor(image_processor.image_mean).view(1, -1, 1, 1)
    std = resized.new_tensor(image_processor.image_std).view(1, -1, 1, 1)
    return (resized - mean) / std


def grounding_dino_pixel_values(images: torch.Tensor, image_processor) -> torch.Tensor:
    """GroundingDINO's input for ``[B, 3, H, W]`` images in [0, 1], as its image processor prepares it: resized keeping
    the aspect ratio (shortest/longest edge of its ``size``) and normalised. Images of one batch share a size, so
    nothing is padded."""
    height, width = images.shape[-2:]
    return _resize_and_normalize(
        images, grounding_dino_resized_size(height, width, image_processor.size), image_processor
    )


def sam_pixel_values(images: torch.Tensor, image_processor) -> tuple[torch.Tensor, tuple[int, int]]:
    """SAM's input for ``[B, 3, H, W]`` images in [0, 1], as its image processor prepares it: longest side resized to
    ``size["longest_edge"]``, normalised, then zero-padded at the bottom and right to ``pad_size``. Also returns the
    resized size (the image's extent inside the padded input)."""
    height, width = images.shape[-2:]
    resized_size = sam_resized_size(height, width, image_processor.size["longest_edge"])
    pixel_values = _resize_and_normalize(images, resized_size, image_processor)
    padded_height, padded_width = image_processor.pad_size["height"], image_processor.pad_size["width"]
    pixel_values = F.pad(pixel_values, (0, padded_width - resized_size[1], 0, padded_height - resized_size[0]))
    return pixel_values, resized_size


def sam_logits_to_masks(
    low_res_logits: torch.Tensor,
    padded_size: tuple[int, int],
    resized_size: tuple[int, int],
    output_size: tuple[int, int],
) -> torch.Tensor:
    """SAM's low-resolution mask logits to binary masks of the original image, as ``SamProcessor.post_process_masks``.

    The logits cover the padded model input, so they are upsampled to the padded size, cropped to the resized image
    and only then resized to the output size; resizing them directly would stretch the padding into the mask.

    Args:
        low_res_logits: ``[N, h, w]`` mask logits.
        padded_size: SAM's input size (the processor's ``pad_size``).
        resized_size: size of the image inside the padded input.
        output_size: size of the returned masks.

    Returns:
        ``[N, *output_size]`` bool masks (logits above 0).
    """
    logits = F.interpolate(low_res_logits.unsqueeze(1).float(), size=padded_size, mode="bilinear", align_corners=False)
    logits = logits[..., : resized_size[0], : resized_size[1]]
    logits = F.interpolate(logits, size=output_size, mode="bilinear", align_corners=False)
    return logits.squeeze(1) > 0


def union_masks_by_index(masks: torch.Tensor, index: torch.Tensor, count: int) -> torch.Tensor:
    """ORs masks that share an index: ``[N, h, w]`` bool masks → ``[count, h, w]`` float {0, 1} masks."""
    union = torch.zeros((count, *masks.shape[1:]), dtype=torch.float32, device=masks.device)
    union.index_add_(0, index, masks.float())
    return (union > 0).float()


@torch.no_grad()
def detect_phrase_boxes(
    model: GroundingDinoForObjectDetection,
    tokenizer,
    image_processor,
    pixels: torch.Tensor,
    captions: list[GroundingCaption],
    box_threshold: float,
    text_threshold: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One GroundingDINO forward on ``pixels`` ``[B, 3, H, W]`` in [0, 1], each image with its caption.

    Returns:
        The phrase of each query ``[B, Q]`` (-1: dropped, see the module docstring), its box ``[B, Q, 4]``
        (normalised cxcywh) and its score ``[B, Q]`` (its highest token score).
    """
    text = tokenizer(
        [caption.text for caption in captions],
        padding=True,
        truncation=True,
        max_length=model.config.max_text_len,
        return_offsets_mapping=True,
        return_tensors="pt",
    )
    token_phrase = torch.stack(
        [token_phrase_indices(offsets, caption.phrase_spans) for offsets, caption in zip(text.offset_mapping, captions)]
    ).to(model.device)
    outputs = model(
        pixel_values=grounding_dino_pixel_values(pixels.to(model.device, torch.float32), image_processor).to(model.dtype),
        input_ids=text.input_ids.to(model.device),
        token_type_ids=text.token_type_ids.to(model.device),
        attention_mask=text.attention_mask.to(model.device),
    )
    # the logits are padded to max_text_len with -inf; only the caption's tokens score
    token_scores = outputs.logits[..., : token_phrase.shape[-1]].float().sigmoid()
    box_phrases = assign_boxes_to_phrases(token_scores, token_phrase, box_threshold, text_threshold)
    return box_phrases, outputs.pred_boxes.float(), token_scores.max(dim=-1).values


def _cannot_load(model_class, name_or_path, flag) -> OSError:
    return OSError(
        f"Could not load {model_class.__name__} from '{name_or_path}' given by {flag}. Pass a local folder that holds "
        f"the saved model and its processor, or a correctly spelled Hub id with network access (HF_HUB_OFFLINE unset) "
        f"so it can be downloaded."
    )


def load_frozen(model_class, name_or_path, flag, device, dtype=torch.float32, cache_dir=None):
    """A transformers model (frozen, eval mode, on ``device``) and its processor (pil backend); a checkpoint of
    another architecture or one that cannot be loaded raises an error naming ``flag``."""
    try:
        config = AutoConfig.from_pretrained(name_or_path, cache_dir=cache_dir)
    except (OSError, ValueError) as error:
        raise _cannot_load(model_class, name_or_path, flag) from error
    expected_type = model_class.config_class.model_type
    # transformers would load another architecture's checkpoint into this class with random weights and only warn
    if config.model_type != expected_type:
        raise ValueError(f"{flag} '{name_or_path}' is a '{config.model_type}' model; expected '{expected_type}'.")
    try:
        model = model_class.from_pretrained(name_or_path, config=config, dtype=dtype, cache_dir=cache_dir)
        # only the processors' configs are used (pixels are prepared in torch): the pil backend needs no torchvision
        processor = AutoProcessor.from_pretrained(name_or_path, cache_dir=cache_dir, backend="pil")
    except (OSError, ValueError) as error:
        raise _cannot_load(model_class, name_or_path, flag) from error
    model.requires_grad_(False).eval().to(device)
    return model, processor


def load_segmenter(args, device):
    """The segmenter of Attribute Concentration: Grounded-SAM (the default), or what ``--segmenter MODULE:NAME`` names.

    A segmenter is any callable ``segmenter(images, queries) -> masks``: ``images`` ``[B, 3, H, W]`` in [0, 1]
    (detached), ``queries`` per image the list of its entities' object names ("traffic light"), and per image a
    ``[N, H, W]`` tensor of binary masks, one per query (all zero where the object is not found).
    ``--segmenter`` names a factory ``NAME(args, device)`` in an importable ``MODULE`` that returns one;
    :class:`GroundedSegmenter` is the default's.
    """
    if args.segmenter is None:
        return GroundedSegmenter.from_pretrained(
            args.grounding_model_name_or_path, args.sam_model_name_or_path, box_threshold=args.box_threshold,
            text_threshold=args.text_threshold, device=device, cache_dir=args.cache_dir,
        )
    return import_factory("--segmenter", args.segmenter, "NAME(args, device)")(args, device)


class GroundedSegmenter:
    """Frozen GroundingDINO + SAM that turn images and their nouns into one binary mask per noun.

    Args:
        grounding_model: GroundingDINO detector.
        grounding_processor: its processor (tokenizer and image-processor config).
        sam_model: SAM segmenter.
        sam_processor: its processor (image-processor config).
        box_threshold: a GroundingDINO query is a box if its highest token score is above this.
        text_threshold: tokens scoring above this form a box's phrase.
    """

    def __init__(
        self,
        grounding_model: GroundingDinoForObjectDetection,
        grounding_processor,
        sam_model: SamModel,
        sam_processor,
        box_threshold: float = 0.3,
        text_threshold: float = 0.25,
    ):
        self.grounding_model = grounding_model
        self.sam_model = sam_model
        self.tokenizer = grounding_processor.tokenizer
        self.box_threshold = box_threshold
        self.text_threshold = text_threshold

        self.grounding_image_processor = grounding_processor.image_processor
        self.sam_image_processor = sam_processor.image_processor

    @classmethod
    def from_pretrained(
        cls,
        grounding_model_name_or_path: str,
        sam_model_name_or_path: str,
        box_threshold: float = 0.3,
        text_threshold: float = 0.25,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        cache_dir: str | None = None,
    ) -> "GroundedSegmenter":
        """Loads both models frozen (eval mode, no gradients) with their processors, from Hub ids or local folders.

        Args:
            grounding_model_name_or_path: GroundingDINO checkpoint (recipe: ``IDEA-Research/grounding-dino-tiny``).
            sam_model_name_or_path: SAM checkpoint (e.g. ``facebook/sam-vit-base``).
            box_threshold: see the class; recipe 0.3.
            text_threshold: see the class; recipe 0.25.
            device: where both models run.
            dtype: weight dtype of both models.
            cache_dir: Hub cache folder.
        """
        grounding_model, grounding_processor = load_frozen(
            GroundingDinoForObjectDetection,
            grounding_model_name_or_path,
            "--grounding_model_name_or_path",
            device,
            dtype,
            cache_dir,
        )
        sam_model, sam_processor = load_frozen(
            SamModel, sam_model_name_or_path, "--sam_model_name_or_path", device, dtype, cache_dir
        )
        return cls(grounding_model, grounding_processor, sam_model, sam_processor, box_threshold, text_threshold)

    @property
    def device(self) -> torch.device:
        return self.grounding_model.device

    @torch.no_grad()
    def __call__(
        self, images: torch.Tensor, nouns: list[list[str]], mask_size: tuple[int, int] | None = None
    ) -> list[torch.Tensor]:
        """Segments the nouns of each image.

        Args:
            images: ``[B, 3, H, W]`` images in [0, 1] (detached here; no gradient flows through the masks).
            nouns: for each image, the nouns to segment.
            mask_size: ``(h, w)`` of the returned masks; defaults to ``(H, W)``.

        Returns:
            For each image b, a float32 tensor ``[len(nouns[b]), h, w]`` of {0, 1} on the images' device: the mask of
            each noun, in the given order (all zeros for a noun that was not found).
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W]; got shape {tuple(images.shape)}.")
        if len(nouns) != images.shape[0]:
            raise ValueError(f"Got {images.shape[0]} images but {len(nouns)} noun lists.")
        check_unit_range(images, "Grounded-SAM")
        height, width = images.shape[-2:]
        mask_size = tuple(mask_size) if mask_size is not None else (height, width)
        masks = [torch.zeros((len(image_nouns), *mask_size), device=images.device) for image_nouns in nouns]

        captions = [build_grounding_caption(image_nouns) for image_nouns in nouns]
        # images without any noun to look for are not run through the models
        grounded = [index for index, caption in enumerate(captions) if caption.phrase_spans]
        if not grounded:
            return masks
        captions = [captions[index] for index in grounded]
        pixels = images.detach()[grounded].to(self.device, torch.float32)

        box_phrases, boxes = self._detect(pixels, captions)
        segmented = [row for row in range(len(grounded)) if (box_phrases[row] >= 0).any()]
        if not segmented:
            return masks
        box_masks = self._segment(
            pixels[segmented], [boxes[row][box_phrases[row] >= 0] for row in segmented], mask_size
        )
        for row, image_box_masks in zip(segmented, box_masks):
            caption = captions[row]
            phrase_masks = union_masks_by_index(
                image_box_masks, box_phrases[row][box_phrases[row] >= 0], len(caption.phrase_spans)
            )
            for noun, phrase in enumerate(caption.phrase_of_noun):
                if phrase >= 0:
                    masks[grounded[row]][noun] = phrase_masks[phrase].to(images.device)
        return masks

    def _detect(self, pixels: torch.Tensor, captions: list[GroundingCaption]) -> tuple[torch.Tensor, torch.Tensor]:
        box_phrases, boxes, _ = detect_phrase_boxes(
            self.grounding_model, self.tokenizer, self.grounding_image_processor, pixels, captions,
            self.box_threshold, self.text_threshold,
        )
        return box_phrases, boxes

    def _segment(
        self, pixels: torch.Tensor, boxes: list[torch.Tensor], mask_size: tuple[int, int]
    ) -> list[torch.Tensor]:
        """SAM on the boxes (normalised cxcywh) of all images: per image, each box's bool mask ``[N_b, *mask_size]``.

        The vision encoder runs once on the batch; the prompt encoder and mask decoder then run on all boxes (in
        chunks of ``SAM_BOXES_PER_CALL``), each box paired with its image's embedding, so images with few boxes
        cost no padding.
        """
        sam_pixels, resized_size = sam_pixel_values(pixels, self.sam_image_processor)
        image_embeddings = self.sam_model.get_image_embeddings(sam_pixels.to(self.sam_model.dtype))

        box_counts = [len(image_boxes) for image_boxes in boxes]
        image_of_box = torch.arange(len(boxes), device=self.device).repeat_interleave(
            torch.tensor(box_counts, device=self.device)
        )
        sam_boxes = normalized_cxcywh_to_xyxy(torch.cat(boxes), *resized_size)
        masks = []
        # Each box carries a copy of its image's embedding (4 MB for SAM-base) and a full-size mask: chunks
        # bound the memory when a detector returns many boxes (an untrained one can return hundreds).
        for start in range(0, len(sam_boxes), SAM_BOXES_PER_CALL):
            chunk = slice(start, start + SAM_BOXES_PER_CALL)
            outputs = self.sam_model(
                image_embeddings=image_embeddings[image_of_box[chunk]],
                input_boxes=sam_boxes[chunk].unsqueeze(1).to(self.sam_model.dtype),
                # A box is an unambiguous prompt: SAM's single-mask output (as in Grounded-SAM).
                multimask_output=False,
            )
            low_res_logits = outputs.pred_masks[:, 0, 0]  # [boxes, 1 prompt, 1 mask, h, w]
            masks.append(sam_logits_to_masks(low_res_logits, sam_pixels.shape[-2:], resized_size, mask_size))
        masks = torch.cat(masks)
        return list(masks.split(box_counts))
