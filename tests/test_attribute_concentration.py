"""Tests of utils/attribute_concentration.py: hand-computed losses and gradients through real captured maps."""

import math

import pytest
import torch
from peft import LoraConfig

from utils.attention_capture import install_attention_capture
from utils.attribute_concentration import attribute_concentration_losses, pixel_loss, resize_masks, token_loss
from utils.tiny_models import TINY_CROSS_ATTENTION_DIM, tiny_sd_unet

# One image, one layer: 2 heads x 4 pixels x 3 tokens, each row a softmax over the tokens.
ATTENTION = torch.tensor(
    [
        [[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.2, 0.2, 0.6], [0.4, 0.4, 0.2]],
        [[0.7, 0.2, 0.1], [0.2, 0.2, 0.6], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]],
    ]
)
# Entity 0 = tokens 0 and 1 ("red book") on pixels 0-1, entity 1 = token 2 ("vase") on pixel 2.
TOKEN_POSITIONS = [[0, 1], [2]]
MASKS = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])



def test_token_loss_by_hand():
    # Share of each token's attention inside its entity's mask, per head (inside / column total):
    # token 0: head 0 (0.5 + 0.1) / 1.2, head 1 (0.7 + 0.2) / 1.3
    # token 1: head 0 (0.3 + 0.6) / 1.5, head 1 (0.2 + 0.2) / 1.5
    # token 2: head 0 0.6 / 1.3,         head 1 0.1 / 1.2
    share_0 = (0.6 / 1.2 + 0.9 / 1.3) / 2
    share_1 = (0.9 / 1.5 + 0.4 / 1.5) / 2
    share_2 = (0.6 / 1.3 + 0.1 / 1.2) / 2
    # shares 0.59615, 0.43333, 0.27244 -> squared misses 0.16309, 0.32111, 0.52935
    expected = (((1 - share_0) ** 2 + (1 - share_1) ** 2) / 2 + (1 - share_2) ** 2) / 2
    assert math.isclose(expected, (0.16309 + 0.32111) / 4 + 0.52935 / 2, abs_tol=1e-5)
    assert token_loss(ATTENTION, MASKS, TOKEN_POSITIONS).item() == pytest.approx(expected, rel=1e-6)


def test_token_loss_with_all_zero_mask():
    # A noun that was not found: no attention falls inside, each of its tokens contributes (1 - 0)^2 = 1.
    masks = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    share_0 = (0.6 / 1.2 + 0.9 / 1.3) / 2
    share_1 = (0.9 / 1.5 + 0.4 / 1.5) / 2
    expected = (((1 - share_0) ** 2 + (1 - share_1) ** 2) / 2 + 1.0) / 2
    assert token_loss(ATTENTION, masks, TOKEN_POSITIONS).item() == pytest.approx(expected, rel=1e-6)


def test_token_loss_is_zero_for_perfect_alignment():
    # Tokens 0 and 1 attend only inside pixels 0-1, token 2 only inside pixel 2; token 3 takes the rest.
    attention = torch.tensor(
        [
            [[0.6, 0.3, 0.0, 0.1], [0.2, 0.2, 0.0, 0.6], [0.0, 0.0, 0.9, 0.1], [0.0, 0.0, 0.0, 1.0]],
            [[0.1, 0.1, 0.0, 0.8], [0.5, 0.4, 0.0, 0.1], [0.0, 0.0, 0.3, 0.7], [0.0, 0.0, 0.0, 1.0]],
        ]
    )
    assert token_loss(attention, MASKS, TOKEN_POSITIONS).item() == pytest.approx(0.0, abs=1e-12)


def test_token_loss_keeps_half_precision_maps_finite():
    attention = torch.zeros(2, 4, 3, dtype=torch.float16)
    attention[..., 0] = 1.0  # tokens 1 and 2 get no attention at all: the eps guards 0 / 0
    loss = token_loss(attention, MASKS, TOKEN_POSITIONS)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


MEAN_ATTENTION = torch.tensor([[0.6, 0.25, 0.15], [0.15, 0.4, 0.45], [0.15, 0.5, 0.35], [0.35, 0.35, 0.3]])


def test_pixel_loss_by_hand():
    # Entity 0 (tokens 0 + 1) per pixel: 0.85, 0.55, 0.65, 0.70 against mask 1, 1, 0, 0.
    entity_0 = -(math.log(0.85) + math.log(0.55) + math.log(1 - 0.65) + math.log(1 - 0.70)) / 4
    # Entity 1 (token 2) per pixel: 0.15, 0.45, 0.35, 0.30 against mask 0, 0, 1, 0.
    entity_1 = -(math.log(1 - 0.15) + math.log(1 - 0.45) + math.log(0.35) + math.log(1 - 0.30)) / 4
    expected = (entity_0 + entity_1) / 2
    # -log: 0.16252 + 0.59784 + 1.04982 + 1.20397 and 0.16252 + 0.59784 + 1.04982 + 0.35667
    assert math.isclose(expected, (3.01415 / 4 + 2.16685 / 4) / 2, abs_tol=1e-5)
    assert pixel_loss(MEAN_ATTENTION, MASKS, TOKEN_POSITIONS).item() == pytest.approx(expected, rel=1e-6)


def test_pixel_loss_with_all_zero_mask():
    masks = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    entity_0 = -(math.log(0.85) + math.log(0.55) + math.log(1 - 0.65) + math.log(1 - 0.70)) / 4
    entity_1 = -(math.log(1 - 0.15) + math.log(1 - 0.45) + math.log(1 - 0.35) + math.log(1 - 0.30)) / 4
    assert pixel_loss(MEAN_ATTENTION, masks, TOKEN_POSITIONS).item() == pytest.approx(
        (entity_0 + entity_1) / 2, rel=1e-6
    )


def test_pixel_loss_clamps_saturated_attention():
    mean_attention = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    masks = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    loss = pixel_loss(mean_attention, masks, TOKEN_POSITIONS, eps=1e-6)
    # A pixel whose summed attention is exactly 0 or 1 against the opposite label costs -log(1e-6).
    # Entity 0 (tokens 0 + 1): sums 0, 1, 0, 1 against mask 0, 0, 1, 0 -> 3 of 4 pixels wrong.
    # Entity 1 (token 2): sums 1, 0, 1, 0 against mask 0, 0, 0, 0 -> 2 of 4 pixels wrong.
    assert torch.isfinite(loss)
    # (float32 rounds 1 - 1e-6, hence the tolerance)
    assert loss.item() == pytest.approx((3 / 4 + 2 / 4) / 2 * -math.log(1e-6), rel=2e-3)


def test_losses_are_float32_under_autocast():
    # Under autocast a matmul would run in bfloat16, where the pixel loss clamp 1 - 1e-6 rounds to 1.
    mean_attention = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    expected_token = token_loss(ATTENTION, MASKS, TOKEN_POSITIONS)
    expected_pixel = pixel_loss(mean_attention, MASKS, TOKEN_POSITIONS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_token = token_loss(ATTENTION, MASKS, TOKEN_POSITIONS)
        autocast_pixel = pixel_loss(mean_attention, MASKS, TOKEN_POSITIONS)
    assert autocast_token.dtype == autocast_pixel.dtype == torch.float32
    assert torch.equal(autocast_token, expected_token) and torch.equal(autocast_pixel, expected_pixel)


def test_losses_without_entities_are_zero():
    empty = torch.zeros(0, 4)
    assert token_loss(ATTENTION, empty, []).item() == 0.0
    assert pixel_loss(MEAN_ATTENTION, empty, []).item() == 0.0


def test_losses_check_their_inputs():
    with pytest.raises(ValueError, match="2 masks but token positions for 1"):
        token_loss(ATTENTION, MASKS, [[0]])
    with pytest.raises(ValueError, match="no token positions"):
        pixel_loss(MEAN_ATTENTION, MASKS, [[0], []])
    with pytest.raises(ValueError, match="outside"):
        token_loss(ATTENTION, MASKS, [[0], [3]])


def test_resize_masks():
    mask = torch.zeros(1, 4, 4)
    mask[0, :2, :2] = 1.0  # top-left cell fully covered
    mask[0, 0, 2] = 1.0  # top-right cell covered by 1 / 4
    mask[0, 2:, 2:] = 1.0
    mask[0, 3, 3] = 0.0  # bottom-right cell covered by 3 / 4
    mask[0, 2, 0] = mask[0, 3, 0] = 1.0  # bottom-left cell covered by exactly 1 / 2
    assert resize_masks(mask, 2).tolist() == [[1.0, 0.0, 1.0, 1.0]]
    assert resize_masks(mask.bool(), 4).tolist() == [mask.flatten().tolist()]
    upsampled = resize_masks(torch.tensor([[[1.0, 0.0], [0.0, 0.0]]]), 4)
    assert upsampled.view(4, 4)[:2, :2].all() and upsampled.sum() == 4
    assert resize_masks(torch.zeros(0, 8, 8), 2).shape == (0, 4)


def test_a_small_detected_object_is_never_lost_at_a_coarse_map():
    """A 60 × 60 px object at 512 px covers under half of every 64 px cell of the 8 × 8 map."""
    mask = torch.zeros(2, 512, 512)
    mask[0, 100:160, 300:360] = 1.0
    for side in (8, 16, 32, 64):
        resized = resize_masks(mask, side)
        assert resized[0].sum() >= 1, side
        assert resized[1].sum() == 0, side  # nothing detected stays empty
    cell = resize_masks(mask, 8)[0].view(8, 8).nonzero().tolist()
    assert cell == [[2, 5]]  # the cell holding most of the object (rows 128-160, columns 320-360)


# ---------------------------------------------------------------------------------------------------- batch reduction


def random_maps(batch, heads, side, tokens, generator):
    return torch.randn(batch, heads, side * side, tokens, generator=generator).softmax(-1)


def test_batch_reduction_sums_maps_groups_and_steps():
    generator = torch.Generator().manual_seed(0)
    steps = [
        {
            ("mid", 8): [random_maps(2, 2, 2, 5, generator)],
            ("up", 16): [random_maps(2, 2, 4, 5, generator) for _ in range(2)],
        }
        for _ in range(2)
    ]
    masks = torch.zeros(2, 8, 8)
    masks[0, :4] = 1.0
    masks[1, :, 4:] = 1.0
    positions = [[1, 2], [4]]
    token, pixel = attribute_concentration_losses(steps, [masks, torch.zeros(0, 8, 8)], [positions, []])

    expected_token = expected_pixel = 0.0
    for step in steps:
        for maps in step.values():
            side = int(maps[0].shape[2] ** 0.5)
            small_masks = resize_masks(masks, side)
            expected_token += sum(token_loss(m[0], small_masks, positions) for m in maps)
            mean_map = torch.stack([m[0].mean(0) for m in maps]).mean(0)
            expected_pixel += pixel_loss(mean_map, small_masks, positions)
    # Image 1 has no entity: it contributes zero but counts in the batch average.
    torch.testing.assert_close(token, expected_token / 2)
    torch.testing.assert_close(pixel, expected_pixel / 2)

    # The convention: repeating a group's maps doubles its token loss but leaves its pixel loss unchanged.
    doubled = [{group: maps + maps for group, maps in step.items()} for step in steps]
    doubled_token, doubled_pixel = attribute_concentration_losses(
        doubled, [masks, torch.zeros(0, 8, 8)], [positions, []]
    )
    torch.testing.assert_close(doubled_token, 2 * token)
    torch.testing.assert_close(doubled_pixel, pixel)


def test_batch_without_entities_gives_zero_not_nan():
    maps = [{("up", 16): [random_maps(3, 2, 4, 5, torch.Generator().manual_seed(1))]}]
    token, pixel = attribute_concentration_losses(maps, [torch.zeros(0, 8, 8)] * 3, [[], [], []])
    assert token.item() == 0.0 and pixel.item() == 0.0


def test_an_undetected_entity_has_its_attention_lowered_everywhere():
    """The recipe's all-zero mask: the pixel loss lowers the entity's attention at every pixel, the token loss
    leaves it alone."""
    maps = random_maps(2, 2, 4, 5, torch.Generator().manual_seed(2)).requires_grad_(True)
    masks = torch.zeros(2, 8, 8)
    masks[0, :4] = 1.0  # entity 0 (tokens 1, 2) found; entity 1 (token 4) not found
    token, pixel = attribute_concentration_losses([{("up", 16): [maps]}], [masks, masks], [[[1, 2], [4]]] * 2)
    (pixel_gradient,) = torch.autograd.grad(pixel, maps, retain_graph=True)
    (token_gradient,) = torch.autograd.grad(token, maps)
    assert (pixel_gradient[..., 4] > 0).all()
    assert (token_gradient[..., 4] == 0).all() and token_gradient[..., 1:3].abs().sum() > 0


def test_batch_reduction_checks_its_inputs():
    maps = [{("up", 16): [random_maps(2, 2, 4, 5, torch.Generator().manual_seed(1))]}]
    masks = [torch.zeros(0, 8, 8)] * 2
    with pytest.raises(ValueError, match="No attention maps"):
        attribute_concentration_losses([], masks, [[], []])
    with pytest.raises(ValueError, match=r"\[B=3"):
        attribute_concentration_losses(maps, masks + masks[:1], [[], [], []])
    with pytest.raises(ValueError, match="token positions for 1 images"):
        attribute_concentration_losses(maps, masks, [[]])


# ---------------------------------------------------------------------------------------------------- through the UNet


def test_gradients_flow_into_lora_through_captured_maps():
    unet = tiny_sd_unet()
    unet.add_adapter(
        LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights="gaussian")
    )
    store = install_attention_capture(unet, "mid,up", resolution=128)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 16, 16, generator=generator).repeat(2, 1, 1, 1)  # CFG batch [uncond; cond]
    text = torch.randn(4, 7, TINY_CROSS_ATTENTION_DIM, generator=generator)
    with store.capturing():
        unet(latents, torch.tensor(500), text)

    masks = torch.zeros(2, 128, 128)
    masks[0, :64] = 1.0
    masks[1, 40:100, 30:90] = 1.0
    masks_per_image = [masks, torch.zeros(0, 128, 128)]
    token, pixel = attribute_concentration_losses(store.step_maps, masks_per_image, [[[1, 2], [4]], []])
    assert torch.isfinite(token) and torch.isfinite(pixel) and token > 0 and pixel > 0

    captured_query_lora = [
        p
        for n, p in unet.named_parameters()
        if "lora_B" in n and ".attn2.to_q." in n and not n.startswith("down_blocks")
    ]
    for loss in (token, pixel):
        unet.zero_grad()
        loss.backward(retain_graph=True)
        assert captured_query_lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in captured_query_lora)
