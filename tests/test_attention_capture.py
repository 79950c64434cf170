"""Tests of utils/attention_capture.py on real diffusers UNets (tiny, random) with real peft LoRA."""

import os
from collections import Counter

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from peft import LoraConfig
from torch.utils.checkpoint import checkpoint

from utils.attention_capture import (
    SD_DEFAULT_ATTENTION_LAYERS,
    SDXL_DEFAULT_ATTENTION_LAYERS,
    CrossAttentionCaptureProcessor,
    find_cross_attention_layers,
    install_attention_capture,
    parse_attention_layers,
    remove_attention_capture,
    select_attention_layers,
)
from utils.tiny_models import TINY_CROSS_ATTENTION_DIM, tiny_sd_unet, tiny_sdxl_unet

RESOLUTION = 128  # latents of 16 x 16 with the default VAE scale factor 8
TOKENS = 7
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]

SD15_UNET_CONFIG = dict(
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
)
SDXL_UNET_CONFIG = dict(
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)



def sd_inputs(batch_size=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch_size, 4, 16, 16, generator=generator)
    text = torch.randn(batch_size, TOKENS, TINY_CROSS_ATTENTION_DIM, generator=generator)
    return latents, torch.tensor(500), text


def add_lora(unet):
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=LORA_TARGETS, init_lora_weights="gaussian"))
    # Non-zero B so that gradients also reach lora_A and the adapters change the layer outputs.
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)


def lora_gradients(unet, layer_name, projection):
    prefix = f"{layer_name}.{projection}."
    return [p.grad for n, p in unet.named_parameters() if n.startswith(prefix) and "lora_" in n]


# ---------------------------------------------------------------------------------------------------- layer spec


def test_parse_attention_layers():
    assert parse_attention_layers(SD_DEFAULT_ATTENTION_LAYERS) == [("mid", 8), ("up", 16), ("up", 32), ("up", 64)]
    assert parse_attention_layers(SDXL_DEFAULT_ATTENTION_LAYERS) == [("mid", 16), ("up", 16), ("up", 32)]
    assert parse_attention_layers(" UP : 16 , down, up:16 ") == [("up", 16), ("down", None)]


@pytest.mark.parametrize("spec", ["", "  ", "left:8", "up:", "up:x", "up:0", "up:-8", "up:8,,mid", "up:8:2", "mid 8"])
def test_parse_attention_layers_rejects_bad_specs(spec):
    with pytest.raises(ValueError, match=r"--attention_layers.*place\[:size\]"):
        parse_attention_layers(spec)


def test_layers_of_tiny_sd_unet():
    layers = find_cross_attention_layers(tiny_sd_unet(), RESOLUTION)
    assert [(layer.name, layer.place, layer.side, layer.size) for layer in layers] == [
        ("down_blocks.0.attentions.0.transformer_blocks.0.attn2", "down", 16, 64),
        ("down_blocks.1.attentions.0.transformer_blocks.0.attn2", "down", 8, 32),
        ("mid_block.attentions.0.transformer_blocks.0.attn2", "mid", 8, 32),
        ("up_blocks.0.attentions.0.transformer_blocks.0.attn2", "up", 8, 32),
        ("up_blocks.0.attentions.1.transformer_blocks.0.attn2", "up", 8, 32),
        ("up_blocks.1.attentions.0.transformer_blocks.0.attn2", "up", 16, 64),
        ("up_blocks.1.attentions.1.transformer_blocks.0.attn2", "up", 16, 64),
    ]


def test_layers_of_tiny_sdxl_unet():
    layers = find_cross_attention_layers(tiny_sdxl_unet(), RESOLUTION)
    # DownBlock2D/UpBlock2D carry no attention; transformer_layers_per_block=2 gives two layers per attention.
    assert [(layer.name, layer.place, layer.side) for layer in layers] == [
        ("down_blocks.1.attentions.0.transformer_blocks.0.attn2", "down", 8),
        ("down_blocks.1.attentions.0.transformer_blocks.1.attn2", "down", 8),
        ("mid_block.attentions.0.transformer_blocks.0.attn2", "mid", 8),
        ("mid_block.attentions.0.transformer_blocks.1.attn2", "mid", 8),
        ("up_blocks.0.attentions.0.transformer_blocks.0.attn2", "up", 8),
        ("up_blocks.0.attentions.0.transformer_blocks.1.attn2", "up", 8),
        ("up_blocks.0.attentions.1.transformer_blocks.0.attn2", "up", 8),
        ("up_blocks.0.attentions.1.transformer_blocks.1.attn2", "up", 8),
    ]


@pytest.mark.parametrize("fixture", ["tiny_sd_path", "tiny_sdxl_path"])
def test_layers_of_saved_pipelines_use_their_vae_scale_factor(fixture, request):
    path = request.getfixturevalue(fixture)
    unet = UNet2DConditionModel.from_pretrained(os.path.join(path, "unet"))
    vae = AutoencoderKL.from_pretrained(os.path.join(path, "vae"))
    vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    # The tiny VAE downsamples by 2: 32 px images have 16 x 16 latents, the UNet's 8 x 8 level is "size 128".
    layers = select_attention_layers(unet, "mid:128", 32, vae_scale_factor)
    assert [layer.side for layer in layers] == [8] * len(layers) and layers
    assert all(layer.name.startswith("mid_block.") for layer in layers)


def test_real_architectures_default_specs():
    with torch.device("meta"):
        sd15 = UNet2DConditionModel(**SD15_UNET_CONFIG)
        sdxl = UNet2DConditionModel(**SDXL_UNET_CONFIG)
    sd_groups = Counter(layer.group for layer in select_attention_layers(sd15, SD_DEFAULT_ATTENTION_LAYERS, 512))
    assert sd_groups == {("mid", 8): 1, ("up", 16): 3, ("up", 32): 3, ("up", 64): 3}
    sdxl_groups = Counter(layer.group for layer in select_attention_layers(sdxl, SDXL_DEFAULT_ATTENTION_LAYERS, 512))
    assert sdxl_groups == {("mid", 16): 10, ("up", 16): 30, ("up", 32): 6}
    # Sizes are sides at 512 px: at 768 px (SD 2.x) the same spec selects the same layers, with larger maps.
    at_768 = select_attention_layers(sd15, SD_DEFAULT_ATTENTION_LAYERS, 768)
    assert Counter(layer.group for layer in at_768) == sd_groups
    assert sorted({layer.side for layer in at_768}) == [12, 24, 48, 96]


def test_spec_selecting_no_layer_lists_available_pairs():
    unet = tiny_sd_unet()
    with pytest.raises(ValueError, match="Available place:size pairs: down:64, down:32, mid:32, up:64, up:32"):
        select_attention_layers(unet, "mid:8", RESOLUTION)
    with pytest.raises(ValueError, match="'up:16' selects no cross-attention layer"):
        select_attention_layers(unet, "up:32,up:16", RESOLUTION)
    with pytest.raises(ValueError, match="--attention_layers"):
        install_attention_capture(unet, "up;32", RESOLUTION)


# ---------------------------------------------------------------------------------------------------- installation


def test_processors_only_on_selected_layers_and_removal_restores():
    unet = tiny_sd_unet()
    custom = AttnProcessor()
    unet.set_attn_processor(
        {**unet.attn_processors, "up_blocks.1.attentions.0.transformer_blocks.0.attn1.processor": custom}
    )
    before = dict(unet.attn_processors)

    store = install_attention_capture(unet, "mid,up:64", RESOLUTION)
    after = unet.attn_processors
    selected = {f"{layer.name}.processor" for layer in store.layers}
    assert selected == {
        "mid_block.attentions.0.transformer_blocks.0.attn2.processor",
        "up_blocks.1.attentions.0.transformer_blocks.0.attn2.processor",
        "up_blocks.1.attentions.1.transformer_blocks.0.attn2.processor",
    }
    assert store.groups == [("mid", 32), ("up", 64)]
    for key, processor in after.items():
        if key in selected:
            assert isinstance(processor, CrossAttentionCaptureProcessor) and processor.store is store
        else:
            assert processor is before[key]
    assert isinstance(before["down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor"], AttnProcessor2_0)

    with pytest.raises(ValueError, match="already installed"):
        install_attention_capture(unet, "mid", RESOLUTION)

    remove_attention_capture(unet, store)
    assert all(unet.attn_processors[key] is processor for key, processor in before.items())


def test_output_identical_to_stock_processor():
    unet = tiny_sd_unet()
    add_lora(unet)
    latents, timestep, text = sd_inputs()
    with torch.no_grad():
        stock_no_grad = unet(latents, timestep, text).sample
    stock = unet(latents, timestep, text).sample

    store = install_attention_capture(unet, "down,mid,up", RESOLUTION)
    with torch.no_grad():
        assert torch.equal(unet(latents, timestep, text).sample, stock_no_grad)
    assert torch.equal(unet(latents, timestep, text).sample, stock)
    # Capturing only adds the map computation: the sample does not change either.
    with store.capturing():
        captured = unet(latents, timestep, text).sample
    assert len(store.step_maps) == 1
    assert torch.equal(captured, stock)


# ---------------------------------------------------------------------------------------------------- captured maps


def record_layer_calls(unet, layer_names):
    """Forward hooks that keep each layer's inputs and output."""
    calls, handles = {}, []
    modules = dict(unet.named_modules())
    for name in layer_names:

        def hook(module, args, kwargs, output, name=name):
            calls[name] = (args[0], kwargs["encoder_hidden_states"], output)

        handles.append(modules[name].register_forward_hook(hook, with_kwargs=True))
    return calls, handles


@pytest.mark.parametrize(
    "cond_half, batch_size, cond", [("second", 4, slice(2, 4)), ("first", 4, slice(0, 2)), ("all", 3, slice(0, 3))]
)
def test_captured_maps_are_the_layers_attention(cond_half, batch_size, cond):
    unet = tiny_sd_unet()
    add_lora(unet)
    store = install_attention_capture(unet, "mid,up", RESOLUTION, cond_half=cond_half)
    calls, handles = record_layer_calls(unet, [layer.name for layer in store.layers])
    latents, timestep, text = sd_inputs(batch_size)
    with store.capturing():
        unet(latents, timestep, text)
    for handle in handles:
        handle.remove()

    modules = dict(unet.named_modules())
    # The selected groups are contiguous in the UNet and each group's maps are in call order, so the maps
    # flattened over groups pair up with the layers in UNet order.
    assert [layer.group for layer in store.layers] == [g for g, maps in store.maps.items() for _ in maps]
    flat_maps = [m for maps in store.maps.values() for m in maps]
    captured = {layer.name: m for layer, m in zip(store.layers, flat_maps, strict=True)}
    for layer in store.layers:
        attn = modules[layer.name]
        hidden_states, encoder_hidden_states, output = calls[layer.name]
        query = attn.to_q(hidden_states[cond])
        key = attn.to_k(encoder_hidden_states[cond])
        value = attn.to_v(encoder_hidden_states[cond])
        heads, head_dim = attn.heads, query.shape[-1] // attn.heads
        query = query.unflatten(-1, (heads, head_dim)).transpose(1, 2)
        key = key.unflatten(-1, (heads, head_dim)).transpose(1, 2)
        value = value.unflatten(-1, (heads, head_dim)).transpose(1, 2)
        expected = torch.softmax(query @ key.transpose(-1, -2) / head_dim**0.5, dim=-1)

        attention_map = captured[layer.name]
        assert attention_map.shape == (cond.stop - cond.start, heads, layer.side**2, TOKENS)
        assert attention_map.requires_grad
        torch.testing.assert_close(attention_map, expected)
        torch.testing.assert_close(attention_map.sum(-1), torch.ones(attention_map.shape[:-1]))
        # The layer's output for the conditional half is what these probabilities give.
        layer_output = attn.to_out[0]((attention_map @ value).transpose(1, 2).flatten(2))
        torch.testing.assert_close(output[cond], layer_output)


def test_captured_maps_honour_text_attention_mask_and_upcast():
    unet = UNet2DConditionModel.from_config({**tiny_sd_unet().config, "upcast_attention": True})
    latents, timestep, text = sd_inputs()
    keep = torch.ones(4, TOKENS)
    keep[:, -2:] = 0.0  # padding tokens the text encoder marked as such
    stock = unet(latents, timestep, text, encoder_attention_mask=keep).sample
    store = install_attention_capture(unet, "up:64", RESOLUTION)
    with store.capturing():
        captured = unet(latents, timestep, text, encoder_attention_mask=keep).sample
    assert torch.equal(captured, stock)
    for attention_map in store.maps[("up", 64)]:
        assert attention_map[..., -2:].abs().max() == 0.0
        torch.testing.assert_close(attention_map.sum(-1), torch.ones(attention_map.shape[:-1]))


def test_sdxl_capture():
    unet = tiny_sdxl_unet()
    store = install_attention_capture(unet, "mid,up", RESOLUTION)
    generator = torch.Generator().manual_seed(0)
    text = torch.randn(2, TOKENS, unet.config.cross_attention_dim, generator=generator)
    pooled_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    added = {
        "text_embeds": torch.randn(2, pooled_dim, generator=generator),
        "time_ids": torch.randn(2, 6, generator=generator),
    }
    with store.capturing():
        unet(torch.randn(2, 4, 16, 16, generator=generator), torch.tensor(10), text, added_cond_kwargs=added)
    assert {group: [tuple(m.shape) for m in maps] for group, maps in store.maps.items()} == {
        ("mid", 32): [(1, 4, 64, TOKENS)] * 2,
        ("up", 32): [(1, 4, 64, TOKENS)] * 4,
    }


def test_capture_only_inside_capturing_and_with_grad():
    unet = tiny_sd_unet()
    store = install_attention_capture(unet, "up", RESOLUTION)
    latents, timestep, text = sd_inputs()
    assert not store.is_capturing
    unet(latents, timestep, text)
    assert store.step_maps == [] and store.maps == {}

    with store.capturing():
        assert store.is_capturing
        with torch.no_grad():
            unet(latents, timestep, text)
        assert store.step_maps == []
        unet(latents, timestep, text)
        unet(latents, timestep, text)
    assert not store.is_capturing
    # Each UNet call inside capturing() is one step; each step holds every selected layer once.
    assert len(store.step_maps) == 2
    for step in store.step_maps:
        assert {group: len(maps) for group, maps in step.items()} == {("up", 32): 2, ("up", 64): 2}
    assert {group: len(maps) for group, maps in store.maps.items()} == {("up", 32): 4, ("up", 64): 4}

    with store.capturing():
        unet(latents, timestep, text)
    assert len(store.step_maps) == 3
    store.clear()
    assert store.step_maps == [] and store.maps == {}


def test_record_without_grad_for_inference_diagnostics():
    unet = tiny_sd_unet()
    store = install_attention_capture(unet, "mid", RESOLUTION, record_without_grad=True)
    latents, timestep, text = sd_inputs()
    with store.capturing(), torch.no_grad():
        unet(latents, timestep, text)
    assert len(store.step_maps) == 1
    assert [(tuple(m.shape), m.requires_grad) for m in store.maps[("mid", 32)]] == [((2, 4, 64, TOKENS), False)]


def test_cfg_half_needs_even_batch():
    unet = tiny_sd_unet()
    store = install_attention_capture(unet, "mid", RESOLUTION)
    latents, timestep, text = sd_inputs(batch_size=3)
    with store.capturing(), pytest.raises(ValueError, match="cond_half='all'"):
        unet(latents, timestep, text)
    with pytest.raises(ValueError, match="cond_half"):
        install_attention_capture(tiny_sd_unet(), "mid", RESOLUTION, cond_half="last")


# ---------------------------------------------------------------------------------------------------- gradients


def map_loss(store):
    # Attention of every map to token 2 over the first half of the pixels: depends on Q and K only.
    return sum(m[:, :, : m.shape[2] // 2, 2].mean() for maps in store.maps.values() for m in maps)


def test_gradients_from_maps_reach_lora_weights():
    unet = tiny_sd_unet()
    add_lora(unet)
    store = install_attention_capture(unet, "mid,up:64", RESOLUTION)
    latents, timestep, text = sd_inputs()
    with store.capturing():
        unet(latents, timestep, text)
    map_loss(store).backward()
    for layer in store.layers:
        for projection in ("to_q", "to_k"):
            gradients = lora_gradients(unet, layer.name, projection)
            assert len(gradients) == 2 and all(g is not None and g.abs().sum() > 0 for g in gradients)
    # The last captured layer's value projection only acts after every map has been computed.
    assert all(g is None for g in lora_gradients(unet, store.layers[-1].name, "to_v"))


def test_gradient_checkpointing_gives_the_same_gradients():
    latents, timestep, text = sd_inputs()

    def gradients(checkpointing):
        unet = tiny_sd_unet()
        add_lora(unet)
        if checkpointing == "diffusers":  # per transformer/resnet block, as enable_gradient_checkpointing does
            unet.enable_gradient_checkpointing()
        unet.train()
        store = install_attention_capture(unet, "mid,up", RESOLUTION)
        with store.capturing():
            if checkpointing == "whole_unet":  # one non-reentrant checkpoint around the UNet call
                sample = checkpoint(lambda x: unet(x, timestep, text).sample, latents, use_reentrant=False)
            else:
                sample = unet(latents, timestep, text).sample
        # Backward after capturing(), as in training: the recomputation runs the non-capturing path.
        (sample.square().mean() + map_loss(store)).backward()
        return {n: p.grad for n, p in unet.named_parameters() if "lora_" in n}

    reference = gradients(None)
    for checkpointing in ("diffusers", "whole_unet"):
        checkpointed = gradients(checkpointing)
        assert checkpointed.keys() == reference.keys()
        for name, gradient in reference.items():
            torch.testing.assert_close(checkpointed[name], gradient, msg=f"{checkpointing}: {name}")


def test_clear_releases_captured_graph():
    import gc
    import weakref

    unet = tiny_sd_unet()
    unet.enable_gradient_checkpointing()
    unet.train()
    store = install_attention_capture(unet, "up", RESOLUTION)
    latents, timestep, text = sd_inputs()
    with store.capturing():
        unet(latents, timestep, text)
    references = [weakref.ref(m) for maps in store.maps.values() for m in maps]
    store.clear()
    gc.collect()
    assert references and all(reference() is None for reference in references)
