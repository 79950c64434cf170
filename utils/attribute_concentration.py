"""Attribute-concentration losses of CoMat (paper Sec. 3.3): token loss and pixel loss on cross-attention maps.

For an entity ``i`` (a noun and its attributes) with token positions ``K_i`` and binary mask ``M_i`` over the
map's pixels, and ``N`` entities in the image:

* token loss ``L_token = (1/N) Σ_i (1/|K_i|) Σ_{k∈K_i} (1 − mean_h[ Σ_u A_h[u,k]·M_i[u] / Σ_u A_h[u,k] ])²``:
  the share of each entity token's attention that falls inside the entity's region should be 1;
* pixel loss ``L_pixel = (1/N) Σ_i BCE(Σ_{k∈K_i} Ā[u,k], M_i[u])`` with ``Ā`` the head- and layer-averaged map
  and the BCE averaged over pixels: inside the region the entity's tokens should take the attention,
  outside they should not.

Reduction (:func:`attribute_concentration_losses`), the recipe's convention, kept on purpose:

* within a layer group ``(place, size)`` of one step, the token loss is **summed** over the group's maps,
  and the pixel loss is computed once on the group-averaged map;
* both are **summed** over layer groups and captured steps, and **averaged** over the images of the batch
  (an image without entities counts in the average with zero).

Why the sum over a group's maps: the group sizes differ a lot (SD1.5 at 512 px: 1, 3, 3, 3 maps for
``mid:8, up:16, up:32, up:64``; SDXL: 10, 30, 6 maps for ``mid:16, up:16, up:32``), so the sum gives each group
a weight proportional to its layer count. Averaging instead would be tidier but no single rescaling of
``w_token`` reproduces the recipe's per-group weights, while summing makes the recipe's published weights
(``w_token = 1e-3``, ``w_pixel = 5e-5``, tuned on the authors' code, which sums: see ``tc_loss_utils.py`` of
CaraJ7/CoMat) the right defaults as they stand. The pixel loss needs no such choice: the recipe, the paper
and the method page all define it on the layer-averaged map.

Masks: :func:`resize_masks` brings a full-resolution mask to a map's side by area averaging (the fraction of
each attention cell that the mask covers) and keeps a cell when at least half of it is covered. The authors'
code instead keeps a cell when *any* of it is covered, which dilates small objects at the 8×8 and 16×16
maps; the majority rule keeps the region's size unbiased at every map resolution. A detected object smaller
than half a cell would vanish under the majority rule, and the pixel loss would then push its tokens'
attention to zero everywhere; such a mask keeps the cells it covers most instead, so a detected entity is
never empty at any resolution.

Undetected entities: as in the recipe, a noun the segmenter does not find has an all-zero mask, so the pixel
loss lowers that entity's attention at every pixel (the token loss has no gradient there). Leaving such
entities out instead was measured in the shapes world and changed nothing (README, "Does it work?").
"""

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

TOKEN_LOSS_EPS = 1e-8
PIXEL_LOSS_EPS = 1e-6
MASK_THRESHOLD = 0.5


def _check_entities(attention_tokens: int, masks: torch.Tensor, token_positions: Sequence[Sequence[int]]):
    if masks.shape[0] != len(token_positions):
        raise ValueError(f"{masks.shape[0]} masks but token positions for {len(token_positions)} entities.")
    for index, positions in enumerate(token_positions):
        if len(positions) == 0:
            raise ValueError(f"Entity {index} has no token positions; drop it before computing the losses.")
        if min(positions) < 0 or max(positions) >= attention_tokens:
            raise ValueError(f"Entity {index} has token positions {list(positions)} outside [0, {attention_tokens}).")


def _flatten_positions(token_positions: Sequence[Sequence[int]], device) -> tuple[list[int], torch.Tensor]:
    """All entities' token positions in one list, and the entity index of each."""
    positions = [position for entity in token_positions for position in entity]
    entity_of_position = torch.repeat_interleave(
        torch.arange(len(token_positions), device=device),
        torch.tensor([len(entity) for entity in token_positions], device=device),
    )
    return positions, entity_of_position


def token_loss(
    attention: torch.Tensor, masks: torch.Tensor, token_positions: Sequence[Sequence[int]], eps: float = TOKEN_LOSS_EPS
) -> torch.Tensor:
    """Token loss of one image on one attention map, a scalar in float32 (also under autocast).

    Args:
        attention: ``[heads, pixels, tokens]``, softmax over tokens.
        masks: ``[N, pixels]`` binary masks of the N entities at this map's resolution.
        token_positions: N lists of the token positions of each entity (attributes and noun).
        eps: guards the per-token attention mass ``Σ_u A_h[u, k]`` in the denominator.

    Returns zero for N = 0.
    """
    _check_entities(attention.shape[-1], masks, token_positions)
    if not token_positions:
        return attention.new_zeros((), dtype=torch.float32)
    positions, entity_of_position = _flatten_positions(token_positions, attention.device)
    # Only the entity tokens' columns are cast to float32: the maps stay in their compute dtype.
    entity_attention = attention[:, :, positions].float()  # [heads, pixels, Σ|K_i|]
    position_masks = masks.to(entity_attention)[entity_of_position].T  # [pixels, Σ|K_i|]
    inside = (entity_attention * position_masks).sum(dim=1)  # [heads, Σ|K_i|]
    share_inside = (inside / (entity_attention.sum(dim=1) + eps)).mean(dim=0)  # [Σ|K_i|]
    per_position = (1.0 - share_inside) ** 2
    # Weight 1/(N |K_i|) per position: mean over the entity's tokens, then over entities.
    weights = 1.0 / (len(token_positions) * torch.bincount(entity_of_position).to(per_position))
    return (per_position * weights[entity_of_position]).sum()


def pixel_loss(
    mean_attention: torch.Tensor,
    masks: torch.Tensor,
    token_positions: Sequence[Sequence[int]],
    eps: float = PIXEL_LOSS_EPS,
) -> torch.Tensor:
    """Pixel loss of one image on a head- and layer-averaged attention map, a scalar in float32 (also under autocast).

    Args:
        mean_attention: ``[pixels, tokens]``.
        masks: ``[N, pixels]`` binary masks of the N entities at this map's resolution.
        token_positions: N lists of the token positions of each entity.
        eps: the entity's summed attention is clamped into ``(eps, 1 − eps)`` before the BCE.

    Returns zero for N = 0.
    """
    _check_entities(mean_attention.shape[-1], masks, token_positions)
    if not token_positions:
        return mean_attention.new_zeros((), dtype=torch.float32)
    positions, entity_of_position = _flatten_positions(token_positions, mean_attention.device)
    columns = mean_attention[:, positions].float()  # [pixels, Σ|K_i|]
    entity_attention = columns.new_zeros(columns.shape[0], len(token_positions)).index_add(
        1, entity_of_position, columns
    )
    entity_attention = entity_attention.clamp(eps, 1.0 - eps)  # [pixels, N]
    targets = masks.to(entity_attention).T
    # Written out rather than F.binary_cross_entropy, which refuses to run under autocast. Every entity has
    # the same number of pixels, so the mean over all elements is (1/N) Σ_i mean_u BCE.
    return -(targets * entity_attention.log() + (1.0 - targets) * (1.0 - entity_attention).log()).mean()


def resize_masks(masks: torch.Tensor, side: int, threshold: float = MASK_THRESHOLD) -> torch.Tensor:
    """``[N, H, W]`` masks → ``[N, side * side]`` binary float masks at an attention map's resolution.

    Area interpolation gives each cell the fraction of it that the mask covers; a cell is inside when that
    fraction is at least ``threshold`` (a majority vote for the default 0.5). A non-empty mask that no cell
    covers that much keeps its most-covered cells: a detected entity stays non-empty at every resolution.
    """
    if masks.ndim != 3:
        raise ValueError(f"masks must be [N, H, W], got shape {tuple(masks.shape)}.")
    if masks.shape[0] == 0:
        return masks.new_zeros((0, side * side), dtype=torch.float32)
    coverage = F.interpolate(masks[:, None].float(), size=(side, side), mode="area").flatten(1)
    most_covered = coverage.amax(dim=1, keepdim=True)
    inside = (coverage >= threshold) | ((coverage == most_covered) & (most_covered > 0))
    return inside.float()


def attribute_concentration_losses(
    step_maps: Sequence[Mapping[tuple, Sequence[torch.Tensor]]],
    masks_per_image: Sequence[torch.Tensor],
    token_positions_per_image: Sequence[Sequence[Sequence[int]]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token and pixel loss of a batch, reduced as described in the module docstring.

    Args:
        step_maps: the captured steps, e.g. ``AttentionStore.step_maps``: one mapping per step from a layer
            group ``(place, size)`` to that group's maps ``[B, heads, pixels, tokens]`` (square maps).
        masks_per_image: per image, ``[N_b, H, W]`` entity masks at any resolution (resized per map here).
        token_positions_per_image: per image, N_b lists of token positions.

    Returns:
        ``(token_loss, pixel_loss)``, float32 scalars; both zero when no image has an entity.
    """
    groups = [(group, group_maps) for step in step_maps for group, group_maps in step.items() if group_maps]
    if not groups:
        raise ValueError("No attention maps were captured: run the attention-loss UNet calls inside capturing().")
    batch_size = len(masks_per_image)
    if len(token_positions_per_image) != batch_size:
        raise ValueError(f"{batch_size} mask sets but token positions for {len(token_positions_per_image)} images.")
    for group, group_maps in groups:
        for group_map in group_maps:
            if group_map.ndim != 4 or group_map.shape[0] != batch_size:
                shape = tuple(group_map.shape)
                raise ValueError(
                    f"Maps of group {group} must be [B={batch_size}, heads, pixels, tokens], got {shape}."
                )
            if math.isqrt(group_map.shape[2]) ** 2 != group_map.shape[2]:
                raise ValueError(f"Maps of group {group} have {group_map.shape[2]} pixels, not a square map.")

    device = groups[0][1][0].device
    total_token = torch.zeros((), dtype=torch.float32, device=device)
    total_pixel = torch.zeros((), dtype=torch.float32, device=device)
    for image, (masks, token_positions) in enumerate(zip(masks_per_image, token_positions_per_image, strict=True)):
        if len(token_positions) == 0:
            continue
        masks_by_side = {}
        for _, group_maps in groups:
            side = math.isqrt(group_maps[0].shape[2])
            if side not in masks_by_side:
                masks_by_side[side] = resize_masks(masks.to(device), side)
            image_maps = [group_map[image] for group_map in group_maps]
            for image_map in image_maps:
                total_token = total_token + token_loss(image_map, masks_by_side[side], token_positions)
            mean_map = torch.stack([image_map.mean(dim=0, dtype=torch.float32) for image_map in image_maps]).mean(
                dim=0
            )
            total_pixel = total_pixel + pixel_loss(mean_map, masks_by_side[side], token_positions)
    return total_token / batch_size, total_pixel / batch_size
