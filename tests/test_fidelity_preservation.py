"""Fidelity Preservation: the shared-UNet discriminator, its losses, and the reference-latent cache.

Everything runs on the real diffusers UNet with real peft adapters, on tiny random models.
"""

import json
import math
import os
import re
import shutil
import time

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer

from utils.fidelity_preservation import (
    DISCRIMINATOR_CONFIG_NAME,
    DISCRIMINATOR_WEIGHTS_NAME,
    LORA_TARGET_MODULES,
    ReferenceLatentCache,
    UNetDiscriminator,
    discriminator_accuracy,
    discriminator_loss,
    generator_adversarial_loss,
    latent_moment_loss,
    lora_disabled,
    reference_noise_seed,
)
from utils.tiny_models import TINY_CROSS_ATTENTION_DIM, tiny_sd_unet, tiny_sdxl_unet

LAST_TIMESTEP = 1
LATENT_SHAPE = (4, 8, 8)


def _randomize_lora_b(unet, adapter_name, seed, std=0.1):
    # init_lora_weights="gaussian" only draws lora_A; lora_B starts at zero, so the adapter would be a no-op.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if f"lora_B.{adapter_name}." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def _generator_unet(unet_factory=tiny_sd_unet, seed=0):
    """A frozen tiny UNet with a non-zero, trainable generator LoRA "default", as the training script builds it."""
    unet = unet_factory(seed)
    unet.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=list(LORA_TARGET_MODULES), init_lora_weights="gaussian")
    )
    _randomize_lora_b(unet, "default", seed + 1)
    return unet


def _lora_parameters(unet, adapter_name):
    return {name: param for name, param in unet.named_parameters() if f".{adapter_name}." in name}


def _adapter_state(unet):
    """Everything adapter switching could change: active adapters, the enabled switch, requires_grad flags."""
    return (
        unet.active_adapters(),
        [module.disable_adapters for module in unet.modules() if isinstance(module, BaseTunerLayer)],
        {name: param.requires_grad for name, param in unet.named_parameters()},
    )


def _empty_prompt_embedding(batch_size, dim=TINY_CROSS_ATTENTION_DIM):
    return torch.randn(1, 5, dim, generator=torch.Generator().manual_seed(7)).expand(batch_size, -1, -1)


def _latents(batch_size, mean, seed, std=0.1):
    return mean + std * torch.randn(batch_size, *LATENT_SHAPE, generator=torch.Generator().manual_seed(seed))


def _numel(parameters):
    return sum(param.numel() for param in parameters)


# --------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------


def test_losses_and_accuracy_equal_hand_computed_values():
    real_logits = torch.tensor([2.0, -1.0, 3.0, 4.0]).view(1, 1, 2, 2)
    fake_logits = torch.tensor([0.5, 1.5, -2.0, -1.0]).view(1, 1, 2, 2)

    def bce_target_one(x):
        return math.log1p(math.exp(-x))

    def bce_target_zero(x):
        return math.log1p(math.exp(x))

    expected_d = (
        sum(map(bce_target_one, [2.0, -1.0, 3.0, 4.0])) / 4 + sum(map(bce_target_zero, [0.5, 1.5, -2.0, -1.0])) / 4
    )
    expected_g = sum(map(bce_target_one, [0.5, 1.5, -2.0, -1.0])) / 4

    assert discriminator_loss(real_logits, fake_logits).item() == pytest.approx(expected_d, rel=1e-6)
    assert generator_adversarial_loss(fake_logits).item() == pytest.approx(expected_g, rel=1e-6)
    accuracy_real, accuracy_fake = discriminator_accuracy(real_logits, fake_logits)
    assert (accuracy_real.item(), accuracy_fake.item()) == (0.75, 0.5)


# --------------------------------------------------------------------------------------------------
# Discriminator on the generator's UNet
# --------------------------------------------------------------------------------------------------


def test_discriminator_learns_to_separate_real_from_fake_latents():
    torch.manual_seed(0)
    unet = _generator_unet()
    discriminator = UNetDiscriminator.from_unet(unet, rank=4)
    discriminator.requires_grad_(True)
    optimizer = torch.optim.AdamW(discriminator.trainable_parameters(), lr=3e-2, betas=(0.0, 0.999))
    empty = _empty_prompt_embedding(4)

    losses, accuracies = [], []
    for step in range(30):
        real_logits = discriminator(_latents(4, 1.0, seed=2 * step), LAST_TIMESTEP, empty)
        fake_logits = discriminator(_latents(4, -1.0, seed=2 * step + 1), LAST_TIMESTEP, empty)
        loss = discriminator_loss(real_logits, fake_logits)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        accuracies.append(discriminator_accuracy(real_logits, fake_logits))

    assert losses[-1] < 0.4 * losses[0], losses
    assert sum(accuracies[0]).item() < 1.5, accuracies[0]  # one class is mostly wrong before training
    accuracy_real, accuracy_fake = accuracies[-1]
    assert accuracy_real.item() > 0.95 and accuracy_fake.item() > 0.95


def test_discriminator_forward_uses_only_its_own_adapter():
    unet = _generator_unet()
    discriminator = UNetDiscriminator.from_unet(unet, rank=4)
    latents, empty = _latents(2, 0.0, seed=0, std=1.0), _empty_prompt_embedding(2)
    with torch.no_grad():
        logits = discriminator(latents, LAST_TIMESTEP, empty)

        _randomize_lora_b(unet, "default", seed=100)
        assert torch.equal(discriminator(latents, LAST_TIMESTEP, empty), logits)

        _randomize_lora_b(unet, "discriminator", seed=101)
        assert not torch.allclose(discriminator(latents, LAST_TIMESTEP, empty), logits)


def test_generator_step_sends_gradient_to_generator_lora_only():
    unet = _generator_unet()
    discriminator = UNetDiscriminator.from_unet(unet, rank=4)
    state = _adapter_state(unet)
    assert state[0] == ["default"]
    assert all(not param.requires_grad for param in discriminator.trainable_parameters())

    noise, empty = _latents(2, 0.0, seed=0, std=1.0), _empty_prompt_embedding(2)
    fake_latents = unet(noise, 500, encoder_hidden_states=empty).sample  # a tiny function of the generator LoRA
    logits = discriminator(fake_latents, LAST_TIMESTEP, empty)
    assert logits.shape == (2, 1, 8, 8) and logits.dtype == torch.float32
    assert _adapter_state(unet) == state

    generator_adversarial_loss(logits).backward()

    generator_lora = _lora_parameters(unet, "default")
    assert all(param.grad is not None for param in generator_lora.values())
    assert sum(param.grad.abs().sum() for param in generator_lora.values()) > 0
    assert all(param.grad is None for param in discriminator.trainable_parameters())
    assert all(param.grad is None for name, param in unet.named_parameters() if "lora_" not in name)

    # A frozen D builds no graph of its own: on latents without gradient its logits have none.
    assert not discriminator(noise, LAST_TIMESTEP, empty).requires_grad

    # The adapter state is restored also when the UNet call fails.
    with pytest.raises(RuntimeError):
        discriminator(noise, LAST_TIMESTEP, torch.randn(2, 5, TINY_CROSS_ATTENTION_DIM + 1))
    assert _adapter_state(unet) == state


def test_a_generator_step_on_the_adversarial_loss_makes_the_fakes_look_more_real_to_the_frozen_discriminator():
    # The sign of the whole path: generator LoRA -> fake latents -> D (its own adapter) -> L_adv_G -> back. Measured on
    # D's logits, not on the loss itself (any loss falls along its own gradient).
    unet = _generator_unet()
    discriminator = UNetDiscriminator.from_unet(unet, rank=4)
    _randomize_lora_b(unet, "discriminator", seed=3)
    noise, empty = _latents(2, 0.0, seed=0, std=1.0), _empty_prompt_embedding(2)

    def fake_logits():
        return discriminator(unet(noise, 500, encoder_hidden_states=empty).sample, LAST_TIMESTEP, empty)

    logits_before = fake_logits()
    generator_adversarial_loss(logits_before).backward()
    generator_lora = list(_lora_parameters(unet, "default").values())
    gradient_norm = torch.sqrt(sum((param.grad**2).sum() for param in generator_lora))
    with torch.no_grad():
        for param in generator_lora:
            param -= 1e-2 * param.grad / gradient_norm
        logits_after = fake_logits()
    assert logits_after.mean() > logits_before.mean() + 1e-4, (logits_before.mean().item(), logits_after.mean().item())


def test_discriminator_step_updates_discriminator_and_leaves_generator_lora_unchanged():
    unet = _generator_unet()
    discriminator = UNetDiscriminator.from_unet(unet, rank=4)
    optimizer = torch.optim.AdamW(discriminator.trainable_parameters(), lr=1e-3, betas=(0.0, 0.999))
    generator_before = {name: param.detach().clone() for name, param in _lora_parameters(unet, "default").items()}
    discriminator_before = [param.detach().clone() for param in discriminator.trainable_parameters()]

    noise, empty = _latents(2, 0.0, seed=0, std=1.0), _empty_prompt_embedding(2)
    fake_latents = unet(noise, 500, encoder_hidden_states=empty).sample
    discriminator.requires_grad_(True)
    state = _adapter_state(unet)
    loss = discriminator_loss(
        discriminator(_latents(2, 1.0, seed=1), LAST_TIMESTEP, empty),
        discriminator(fake_latents.detach(), LAST_TIMESTEP, empty),
    )
    assert _adapter_state(unet) == state
    loss.backward()
    optimizer.step()

    for name, param in _lora_parameters(unet, "default").items():
        assert param.grad is None and torch.equal(param, generator_before[name]), name
        assert param.requires_grad
    changed = [
        not torch.equal(param, before)
        for param, before in zip(discriminator.trainable_parameters(), discriminator_before, strict=True)
    ]
    assert all(changed)  # lora_B gets gradient first, then lora_A moves through it; head moves too

    discriminator.requires_grad_(False)
    assert not any(param.requires_grad for param in discriminator.trainable_parameters())
    assert all(param.requires_grad for param in _lora_parameters(unet, "default").values())


def _one_training_step_gradients(gradient_checkpointing):
    unet = _generator_unet()
    discriminator = UNetDiscriminator.from_unet(unet, rank=4)
    _randomize_lora_b(unet, "discriminator", seed=5)
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    discriminator.requires_grad_(True)
    noise, empty = _latents(2, 0.0, seed=0, std=1.0), _empty_prompt_embedding(2)
    fake_latents = unet(noise, 500, encoder_hidden_states=empty).sample
    generator_adversarial_loss(discriminator(fake_latents, LAST_TIMESTEP, empty)).backward()
    parameters = list(_lora_parameters(unet, "default").values()) + discriminator.trainable_parameters()
    return [param.grad for param in parameters]


def test_gradient_checkpointing_on_shared_unet_gives_the_same_gradients():
    # Block-level checkpointing would recompute D's blocks in backward with the generator adapter active.
    reference = _one_training_step_gradients(gradient_checkpointing=False)
    checkpointed = _one_training_step_gradients(gradient_checkpointing=True)
    for expected, actual in zip(reference, checkpointed, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-6)


def test_gradient_checkpointing_on_shared_unet_keeps_only_discriminator_inputs():
    unet = _generator_unet()
    discriminator = UNetDiscriminator.from_unet(unet, rank=4)
    latents = _latents(2, 0.0, seed=0, std=1.0).requires_grad_(True)

    def num_saved_tensors():
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            discriminator(latents, LAST_TIMESTEP, _empty_prompt_embedding(2))
        return len(saved)

    without_checkpointing = num_saved_tensors()
    unet.enable_gradient_checkpointing()
    assert num_saved_tensors() < 10 < without_checkpointing
    assert unet.is_gradient_checkpointing


def test_shared_discriminator_adds_only_its_lora_and_head():
    rank = 8
    unet = _generator_unet()
    unet_numel_before = _numel(unet.parameters())
    base_weight = unet.conv_in.weight
    discriminator = UNetDiscriminator.from_unet(unet, rank=rank)

    head_numel = 4 + 1
    expected_lora_numel = sum(
        rank * (module.in_features + module.out_features)
        for name, module in tiny_sd_unet().named_modules()
        if isinstance(module, torch.nn.Linear) and any(name.endswith(f".{target}") for target in LORA_TARGET_MODULES)
    )
    assert _numel(unet.parameters()) - unet_numel_before == expected_lora_numel
    assert _numel(discriminator.trainable_parameters()) == expected_lora_numel + head_numel
    # The UNet is shared, not owned: D's own module tree holds only the head, and no base weight is copied.
    assert discriminator.unet is unet and unet.conv_in.weight is base_weight
    assert _numel(discriminator.parameters()) == head_numel
    assert all(param.dtype == torch.float32 for param in discriminator.trainable_parameters())


def test_sdxl_discriminator_takes_added_cond_kwargs():
    unet = _generator_unet(tiny_sdxl_unet)
    discriminator = UNetDiscriminator.from_unet(unet, rank=4)
    config = unet.config
    added_cond_kwargs = {
        "text_embeds": torch.randn(
            2, config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        ),
        "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]]).expand(2, -1),
    }
    latents = _latents(2, 0.0, seed=0, std=1.0).requires_grad_(True)
    logits = discriminator(
        latents, LAST_TIMESTEP, _empty_prompt_embedding(2, config.cross_attention_dim), added_cond_kwargs
    )
    assert logits.shape == (2, 1, 8, 8)
    generator_adversarial_loss(logits).backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0


def test_from_pretrained_discriminator_owns_a_frozen_unet(tiny_sd_path):
    discriminator = UNetDiscriminator.from_pretrained(tiny_sd_path, rank=4, dtype=torch.bfloat16)
    reference = UNet2DConditionModel.from_pretrained(tiny_sd_path, subfolder="unet", dtype=torch.bfloat16)

    assert discriminator.owns_unet and list(discriminator.unet.peft_config) == ["discriminator"]
    base_parameters = {n: p for n, p in discriminator.unet.named_parameters() if "lora_" not in n}
    reference_parameters = dict(reference.named_parameters())
    assert {name.replace(".base_layer", "") for name in base_parameters} == set(reference_parameters)
    for name, param in base_parameters.items():
        assert not param.requires_grad
        assert torch.equal(param, reference_parameters[name.replace(".base_layer", "")]), name
    assert all(param.dtype == torch.float32 for param in discriminator.trainable_parameters())

    discriminator.requires_grad_(True)
    latents = _latents(2, 0.0, seed=0, std=1.0)
    logits = discriminator(latents, LAST_TIMESTEP, _empty_prompt_embedding(2))
    assert logits.shape == (2, 1, 8, 8) and logits.dtype == torch.float32
    discriminator_loss(logits, -logits).backward()
    assert all(param.grad is not None for param in discriminator.trainable_parameters())
    assert all(param.grad is None for param in base_parameters.values())


# --------------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------------


def test_save_and_load_restore_discriminator_exactly(tmp_path):
    trained = UNetDiscriminator.from_unet(_generator_unet(), rank=4)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(3)
        for param in trained.trainable_parameters():
            param.copy_(torch.randn(param.shape, generator=generator))
    trained.save(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == sorted([DISCRIMINATOR_WEIGHTS_NAME, DISCRIMINATOR_CONFIG_NAME])
    with open(tmp_path / DISCRIMINATOR_CONFIG_NAME) as f:
        assert json.load(f)["rank"] == 4

    restored = UNetDiscriminator.from_unet(_generator_unet(), rank=4)
    restored.load(str(tmp_path))
    expected, actual = trained.state_dict_for_save(), restored.state_dict_for_save()
    assert set(actual) == set(expected) and any(name.startswith("head.") for name in actual)
    for name in expected:
        assert torch.equal(actual[name], expected[name]), name

    other_rank = UNetDiscriminator.from_unet(_generator_unet(), rank=2)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / DISCRIMINATOR_WEIGHTS_NAME))):
        other_rank.load(str(tmp_path))


def test_load_names_a_truncated_or_missing_discriminator_file(tmp_path):
    discriminator = UNetDiscriminator.from_unet(_generator_unet(), rank=4)
    discriminator.save(str(tmp_path))
    weights_path = tmp_path / DISCRIMINATOR_WEIGHTS_NAME
    weights_path.write_bytes(weights_path.read_bytes()[: weights_path.stat().st_size // 2])
    with pytest.raises(ValueError, match=re.escape(str(weights_path))):
        discriminator.load(str(tmp_path))

    missing_directory = tmp_path / "missing"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing_directory / DISCRIMINATOR_WEIGHTS_NAME))):
        discriminator.load(str(missing_directory))


# --------------------------------------------------------------------------------------------------
# Reference latents
# --------------------------------------------------------------------------------------------------

SETTINGS = {
    "base_model": "tiny-sd",
    "revision": None,
    "sampler": "ddpm",
    "num_inference_steps": 50,
    "guidance_scale": 7.5,
    "resolution": 64,
    "seed": 0,
}


class RecordingGenerator:
    """A ``generate_fn`` that records its calls and returns per-prompt deterministic latents."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompts):
        self.calls.append(list(prompts))
        return torch.stack(
            [
                torch.randn(LATENT_SHAPE, generator=torch.Generator().manual_seed(reference_noise_seed(p, 0)))
                for p in prompts
            ]
        )


def test_cache_generates_missing_latents_once_then_loads_them(tmp_path):
    cache = ReferenceLatentCache(str(tmp_path), SETTINGS)
    generate = RecordingGenerator()

    first = cache.get_or_create(["a red cube", "a blue ball", "a red cube"], generate)
    assert generate.calls == [["a red cube", "a blue ball"]]
    assert first.shape == (3, *LATENT_SHAPE) and torch.equal(first[0], first[2])
    assert os.path.isfile(cache.path("a red cube")) and os.path.isfile(cache.path("a blue ball"))

    second = cache.get_or_create(["a blue ball", "a red cube"], generate)
    assert len(generate.calls) == 1
    assert torch.equal(second, first[[1, 0]])
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]


@pytest.mark.parametrize("damage", ["truncate", "flip_data_byte", "empty"])
def test_cache_regenerates_a_damaged_file(tmp_path, damage):
    cache = ReferenceLatentCache(str(tmp_path), SETTINGS)
    generate = RecordingGenerator()
    original = cache.get_or_create(["a red cube"], generate)
    path = cache.path("a red cube")
    data = bytearray(open(path, "rb").read())
    if damage == "truncate":
        data = data[: len(data) - 16]
    elif damage == "flip_data_byte":
        data[-1] ^= 0xFF
    else:
        data = b""
    with open(path, "wb") as f:
        f.write(data)

    assert cache.get("a red cube") is None
    assert not os.path.exists(path)
    assert torch.equal(cache.get_or_create(["a red cube"], generate), original)
    assert len(generate.calls) == 2 and os.path.isfile(path)


def test_cache_removes_temporary_files_of_killed_writes_but_not_of_writes_in_progress(tmp_path):
    debris, in_progress = tmp_path / ".abc.safetensors.x1.tmp", tmp_path / ".def.safetensors.x2.tmp"
    debris.write_bytes(b"half")
    in_progress.write_bytes(b"half")
    os.utime(debris, (time.time() - 7200, time.time() - 7200))
    ReferenceLatentCache(str(tmp_path), SETTINGS)
    assert not debris.exists() and in_progress.exists()


def test_cache_rejects_a_file_whose_metadata_does_not_match(tmp_path):
    cache = ReferenceLatentCache(str(tmp_path / "a"), SETTINGS)
    cache.put("a red cube", torch.ones(LATENT_SHAPE))

    shutil.copy(cache.path("a red cube"), cache.path("a blue ball"))  # right settings, wrong prompt
    assert cache.get("a blue ball") is None and not os.path.exists(cache.path("a blue ball"))

    other_settings = ReferenceLatentCache(str(tmp_path / "b"), {**SETTINGS, "guidance_scale": 5.0})
    shutil.copy(cache.path("a red cube"), other_settings.path("a red cube"))  # right prompt, wrong settings
    assert other_settings.get("a red cube") is None and not os.path.exists(other_settings.path("a red cube"))

    assert torch.equal(cache.get("a red cube"), torch.ones(LATENT_SHAPE))


def test_cache_key_depends_on_prompt_and_settings_not_their_order(tmp_path):
    cache = ReferenceLatentCache(str(tmp_path), SETTINGS)
    reordered = ReferenceLatentCache(str(tmp_path), dict(reversed(list(SETTINGS.items()))))
    assert cache.key("a red cube") == reordered.key("a red cube")
    assert re.fullmatch(r"[0-9a-f]{64}", cache.key("a red cube"))
    assert cache.key("a red cube") != cache.key("a blue ball")
    for name, value in [("num_inference_steps", 20), ("resolution", 512), ("seed", 1), ("revision", "main")]:
        assert ReferenceLatentCache(str(tmp_path), {**SETTINGS, name: value}).key("a red cube") != cache.key(
            "a red cube"
        )


def test_prefill_generates_only_uncached_prompts_in_batches(tmp_path):
    cache = ReferenceLatentCache(str(tmp_path), SETTINGS)
    generate = RecordingGenerator()
    cache.get_or_create(["p0"], generate)

    generated = cache.prefill(["p0", "p1", "p2", "p1", "p3", "p4"], generate, batch_size=3, show_progress=False)
    assert generated == 4
    assert generate.calls[1:] == [["p1", "p2", "p3"], ["p4"]]
    cache.get_or_create(["p4", "p0", "p2"], generate)
    assert len(generate.calls) == 3

    with pytest.raises(ValueError, match="2 prompts"):
        cache.get_or_create(["p5", "p6"], lambda prompts: torch.zeros(1, *LATENT_SHAPE))


def test_reference_noise_seed_is_stable_across_processes():
    # A constant, not a recomputation: Python's hash() would differ between processes and runs.
    assert reference_noise_seed("a red book and a yellow vase", 0) == 3102122787756533203
    assert reference_noise_seed("a red book and a yellow vase", 1) != reference_noise_seed(
        "a red book and a yellow vase", 0
    )
    assert reference_noise_seed("a yellow book and a red vase", 0) != reference_noise_seed(
        "a red book and a yellow vase", 0
    )
    assert 0 <= reference_noise_seed("", 2**40) < 2**63


def test_lora_disabled_samples_exactly_like_the_base_model(tiny_sd_path):
    def sample(pipe):
        return pipe(
            "a red book and a yellow vase",
            num_inference_steps=3,
            output_type="latent",
            generator=torch.Generator().manual_seed(reference_noise_seed("a red book and a yellow vase", 0)),
            height=64,
            width=64,
        ).images

    base_pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    base_pipe.set_progress_bar_config(disable=True)
    expected = sample(base_pipe)
    del base_pipe

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_path)
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.requires_grad_(False)
    pipe.unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, target_modules=list(LORA_TARGET_MODULES), init_lora_weights="gaussian")
    )
    _randomize_lora_b(pipe.unet, "default", seed=1)
    state = _adapter_state(pipe.unet)

    with lora_disabled(pipe.unet):
        reference = sample(pipe)
    assert torch.equal(reference, expected)
    assert _adapter_state(pipe.unet) == state
    assert not torch.allclose(sample(pipe), expected, atol=1e-3)

    with pytest.raises(RuntimeError, match="inside"):
        with lora_disabled(pipe.unet):
            raise RuntimeError("inside")
    assert _adapter_state(pipe.unet) == state


def test_latent_moment_loss_is_zero_for_the_reference_and_its_gradient_brings_grown_latents_back():
    generator = torch.Generator().manual_seed(0)
    reference = torch.randn(8, 4, 16, 16, generator=generator) * torch.tensor([1.0, 1.2, 0.6, 1.1])[None, :, None, None]
    assert latent_moment_loss(reference, reference) == 0
    fresh = torch.randn(8, 4, 16, 16, generator=generator) * torch.tensor([1.0, 1.2, 0.6, 1.1])[None, :, None, None]
    assert latent_moment_loss(fresh, reference) < 0.01  # other samples of the same distribution: nearly nothing
    grown = (fresh * 8 - 6).requires_grad_(True)  # the blown-up latents of a hacked run: |z| 8, channel means -6
    loss = latent_moment_loss(grown, reference)
    assert loss > 100
    loss.backward()
    with torch.no_grad():
        stepped = grown - 0.5 * grown.grad * grown.numel() / grown.shape[1]  # a step per element of the channel's scale
    assert latent_moment_loss(stepped, reference) < 0.1 * loss.item()
    half = latent_moment_loss(grown.detach().half(), reference.half())
    assert half.dtype == torch.float32 and torch.isfinite(half)
