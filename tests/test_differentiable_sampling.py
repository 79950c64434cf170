"""The truncated-backprop sampler: which steps are trained, and where gradient may and may not flow."""

import pytest
import torch
from peft import LoraConfig

from utils.differentiable_sampling import (
    decode_latents,
    make_sampling_scheduler,
    sample_with_gradient,
    select_attention_steps,
    select_gradient_steps,
)
from utils.fidelity_preservation import lora_disabled
from utils.tiny_models import TINY_CROSS_ATTENTION_DIM, sd_scheduler, tiny_sd_unet, tiny_vae


def test_gradient_steps_evenly_spaced_with_random_offset():
    starts = set()
    for seed in range(200):
        steps = select_gradient_steps(50, 5, torch.Generator().manual_seed(seed))
        assert len(steps) == 5
        assert [b - a for a, b in zip(steps, steps[1:])] == [10] * 4
        assert 0 <= steps[0] <= 9 and steps[-1] <= 49
        starts.add(steps[0])
    assert starts == set(range(10))


@pytest.mark.parametrize("num_steps,num_grad,expected_max_start", [(50, 1, 49), (10, 10, 0), (7, 3, 2)])
def test_gradient_steps_edge_cases(num_steps, num_grad, expected_max_start):
    starts = {select_gradient_steps(num_steps, num_grad, torch.Generator().manual_seed(s))[0] for s in range(300)}
    assert max(starts) == expected_max_start and min(starts) == 0


def test_too_many_gradient_steps_is_rejected_with_the_flag_named():
    with pytest.raises(ValueError, match="--num_grad_steps"):
        select_gradient_steps(10, 11, torch.Generator())


def test_attention_steps_drawn_without_replacement_from_gradient_steps():
    for seed in range(50):
        chosen = select_attention_steps([3, 13, 23, 33, 43], 2, torch.Generator().manual_seed(seed))
        assert len(set(chosen)) == 2 and set(chosen) <= {3, 13, 23, 33, 43}


@pytest.fixture(scope="module")
def lora_unet():
    unet = tiny_sd_unet()
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    # peft starts lora_B at zero (so lora_A gets no gradient); a trained LoRA has both non-zero.
    torch.manual_seed(0)
    for param in _lora_params(unet):
        param.data.normal_(0, 0.1)
    return unet


def _lora_params(unet):
    return [p for n, p in unet.named_parameters() if "lora" in n]


def _run(unet, gradient_steps, num_steps=6, detach=False, record=None, checkpointing=True, reference=None, min_timestep=0):
    torch.manual_seed(0)
    text = torch.randn(2, 3, TINY_CROSS_ATTENTION_DIM)

    def denoise(latent_input, t):
        out = unet(latent_input, t, encoder_hidden_states=text).sample
        if record is not None:
            record.append(out.requires_grad)
        return out

    def base_denoise(latent_input, t):
        with lora_disabled(unet):
            return unet(latent_input, t, encoder_hidden_states=text).sample

    reference_denoise = {None: None, "self": denoise, "base": base_denoise}[reference]

    latents = torch.randn(1, 4, 8, 8)
    scheduler = make_sampling_scheduler("ddpm", sd_scheduler().config)
    return sample_with_gradient(
        denoise, scheduler, latents, num_steps, gradient_steps, guidance_scale=7.5, detach_unet_input=detach,
        gradient_checkpointing=checkpointing, generator=torch.Generator().manual_seed(1), reference_denoise=reference_denoise,
        reference_min_timestep=min_timestep,
    )


def test_no_graph_before_first_gradient_step_and_grad_at_each_gradient_step(lora_unet):
    record = []
    out = _run(lora_unet, [2, 4], record=record)
    # The UNet is traced with grad exactly at the gradient steps (2 and 4), never before or between.
    assert record == [False, False, True, False, True, False]
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in _lora_params(lora_unet))


@pytest.mark.parametrize("step", [0, 3, 5])
def test_each_gradient_step_alone_reaches_the_lora(lora_unet, step):
    lora_unet.zero_grad(set_to_none=True)
    _run(lora_unet, [step]).square().mean().backward()
    grads = [p.grad for p in _lora_params(lora_unet)]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_checkpointing_does_not_change_gradients(lora_unet):
    lora_unet.zero_grad(set_to_none=True)
    _run(lora_unet, [1, 4], checkpointing=True).square().mean().backward()
    with_ckpt = [p.grad.clone() for p in _lora_params(lora_unet)]
    lora_unet.zero_grad(set_to_none=True)
    _run(lora_unet, [1, 4], checkpointing=False).square().mean().backward()
    for a, p in zip(with_ckpt, _lora_params(lora_unet)):
        torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-8)


def test_detach_unet_input_changes_only_the_jacobian_path(lora_unet):
    """Kept input: gradient of the late step also flows through the UNet into the early step's output."""
    grads = {}
    for detach in (False, True):
        lora_unet.zero_grad(set_to_none=True)
        _run(lora_unet, [1, 4], detach=detach).square().mean().backward()
        grads[detach] = torch.cat([p.grad.flatten() for p in _lora_params(lora_unet)])
    assert not torch.allclose(grads[False], grads[True])
    # With a single gradient step there is no earlier trainable step, so detaching changes nothing.
    single = {}
    for detach in (False, True):
        lora_unet.zero_grad(set_to_none=True)
        _run(lora_unet, [3], detach=detach).square().mean().backward()
        single[detach] = torch.cat([p.grad.flatten() for p in _lora_params(lora_unet)])
    torch.testing.assert_close(single[False], single[True])


def test_the_reference_gap_measures_the_lora_and_leaves_the_samples_alone(lora_unet):
    plain = _run(lora_unet, [1, 4])
    same, gap_to_itself = _run(lora_unet, [1, 4], reference="self")
    # The reference runs without touching the trajectory or the sampler's noise generator.
    assert torch.equal(plain, same) and gap_to_itself == 0
    lora_unet.zero_grad(set_to_none=True)
    moved, gap = _run(lora_unet, [1, 4], reference="base")
    assert torch.equal(plain, moved) and gap.dtype == torch.float32 and gap > 0
    gap.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in _lora_params(lora_unet))
    # Its gradient reaches the parameters only, not the latents: keeping the UNet input or not changes nothing.
    grads = {}
    for detach in (False, True):
        lora_unet.zero_grad(set_to_none=True)
        _run(lora_unet, [1, 4], detach=detach, reference="base")[1].backward()
        grads[detach] = torch.cat([p.grad.flatten() for p in _lora_params(lora_unet)])
    torch.testing.assert_close(grads[False], grads[True], rtol=1e-5, atol=1e-8)
    # And it brings the LoRA back toward the base model.
    trained = [p.detach().clone() for p in _lora_params(lora_unet)]
    try:
        grad_norm = torch.cat([p.grad.flatten() for p in _lora_params(lora_unet)]).norm()
        with torch.no_grad():
            for p in _lora_params(lora_unet):
                p -= 0.01 * p.grad / grad_norm
        lora_unet.zero_grad(set_to_none=True)
        assert _run(lora_unet, [1, 4], reference="base")[1] < gap.item()
    finally:
        with torch.no_grad():
            for p, value in zip(_lora_params(lora_unet), trained):
                p.copy_(value)
        lora_unet.zero_grad(set_to_none=True)


def test_the_reference_gap_counts_only_the_steps_from_its_smallest_timestep(lora_unet):
    scheduler = make_sampling_scheduler("ddpm", sd_scheduler().config)
    scheduler.set_timesteps(6)
    between = int(scheduler.timesteps[4]) + 1  # above the timestep of step 4, below that of step 1
    with torch.no_grad():
        first_step_only = _run(lora_unet, [1], reference="base")[1]
        assert _run(lora_unet, [1, 4], reference="base", min_timestep=between)[1] == first_step_only
        assert _run(lora_unet, [1, 4], reference="base")[1] != first_step_only
        assert _run(lora_unet, [1, 4], reference="base", min_timestep=1000)[1] == 0


def test_ddim_sampler_and_decode_to_unit_range(lora_unet):
    scheduler = make_sampling_scheduler("ddim", sd_scheduler().config)
    assert type(scheduler).__name__ == "DDIMScheduler"
    with pytest.raises(ValueError, match="--sampler"):
        make_sampling_scheduler("euler", sd_scheduler().config)
    vae = tiny_vae()
    latents = torch.randn(2, 4, 8, 8, requires_grad=True)
    image = decode_latents(vae, latents)
    assert image.shape == (2, 3, 16, 16) and image.min() >= 0 and image.max() <= 1
    image.mean().backward()
    assert latents.grad.abs().sum() > 0
