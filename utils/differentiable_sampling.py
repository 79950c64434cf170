"""Differentiable sampling: the online, truncated-backprop denoising loop that CoMat trains through.

CoMat fine-tunes the UNet on its *own* samples. An image is generated with T denoising steps
(recipe: DDPM, T = 50, classifier-free guidance 7.5 with the empty prompt as negative); only K of
the T steps (recipe: K = 5) run the UNet with gradient:

* the K gradient steps are evenly spaced with a random offset (:func:`select_gradient_steps`);
* steps before the first gradient step run entirely under ``no_grad`` — nothing upstream of the
  first gradient step can receive gradient, so building a graph there would only cost memory;
* after the first gradient step, the no-grad steps still pass gradient through the (linear)
  scheduler update ``x_{t-1} = a_t x_t + b_t eps + sigma_t z``: the UNet output ``eps`` is a
  constant there, but ``a_t x_t`` carries gradient back to the previous gradient step;
* at a gradient step the UNet runs with gradient checkpointing (non-reentrant), so each gradient
  step stores only its inputs, and memory does not grow with T;
* ``detach_unet_input`` chooses whether the UNet *input* at a gradient step is detached (SDXL
  recipe) or kept (SD1.5 recipe: gradient also flows through the UNet Jacobian into earlier
  latents). The scheduler-update path above is kept either way;
* with ``reference_denoise`` (the frozen base model), each gradient step also runs the reference
  without gradient on the same input, and the sampler returns the mean squared gap of the two guided
  noise predictions: up to a per-step factor, the KL between the two samplers' DDPM steps. Its
  gradient reaches the parameters only, never the latents (with a kept input the trained model runs
  a second time, on the detached input).

The UNet call is a closure supplied by the training script (``denoise(latent_model_input, t)``),
so this module knows nothing about SD vs SDXL conditioning.
"""

from contextlib import nullcontext
from typing import Callable, Optional, Sequence

import torch
from torch.utils.checkpoint import checkpoint

from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

SUPPORTED_SAMPLERS = ("ddpm", "ddim")


def select_gradient_steps(num_inference_steps: int, num_grad_steps: int, generator: torch.Generator) -> list:
    """The K step indices (0-based, in sampling order) that run the UNet with gradient.

    Evenly spaced with interval ``T // K`` and a random start in ``[0, T - interval * (K - 1) - 1]``,
    as in the recipe, so every step of the schedule can be trained and the last one is never forced.
    """
    if not 1 <= num_grad_steps <= num_inference_steps:
        raise ValueError(
            f"--num_grad_steps ({num_grad_steps}) must be between 1 and --num_inference_steps "
            f"({num_inference_steps})."
        )
    interval = num_inference_steps // num_grad_steps
    max_start = num_inference_steps - interval * (num_grad_steps - 1) - 1
    start = int(torch.randint(0, max_start + 1, (1,), generator=generator).item())
    return [start + i * interval for i in range(num_grad_steps)]


def select_attention_steps(gradient_steps: Sequence[int], num_attention_steps: int, generator: torch.Generator) -> list:
    """``num_attention_steps`` of the gradient steps, drawn without replacement (sorted)."""
    if not 0 <= num_attention_steps <= len(gradient_steps):
        raise ValueError(
            f"--attention_loss_steps ({num_attention_steps}) must be between 0 and --num_grad_steps "
            f"({len(gradient_steps)})."
        )
    order = torch.randperm(len(gradient_steps), generator=generator)[:num_attention_steps]
    return sorted(gradient_steps[i] for i in order.tolist())


def make_sampling_scheduler(sampler: str, scheduler_config: dict):
    """A fresh DDPM or DDIM scheduler built from the base model's scheduler config."""
    from diffusers import DDIMScheduler, DDPMScheduler

    if sampler not in SUPPORTED_SAMPLERS:
        raise ValueError(f"--sampler must be one of {SUPPORTED_SAMPLERS}, got {sampler!r}.")
    scheduler_class = DDPMScheduler if sampler == "ddpm" else DDIMScheduler
    # As the stock pipelines run it: never clip or threshold x̂0 (both are pixel-space ideas; in latent space they
    # distort samples), whatever the checkpoint's config says or lacks (the library default clips).
    return scheduler_class.from_config(scheduler_config, clip_sample=False, thresholding=False)


def sample_with_gradient(
    denoise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    scheduler,
    latents: torch.Tensor,
    num_inference_steps: int,
    gradient_steps: Sequence[int],
    guidance_scale: float,
    guidance_rescale: float = 0.0,
    detach_unet_input: bool = False,
    gradient_checkpointing: bool = True,
    attention_steps: Sequence[int] = (),
    attention_capture: Optional[Callable[[], object]] = None,
    generator: Optional[torch.Generator | list[torch.Generator]] = None,
    reference_denoise: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
    reference_min_timestep: int = 0,
):
    """Run T denoising steps and return the final clean latent x̂0, differentiable w.r.t. the K gradient steps.

    With ``reference_denoise`` it returns ``(x̂0, reference_gap)`` instead: ``reference_gap`` is the mean over the
    gradient steps at timesteps ≥ ``reference_min_timestep`` (zero when there is none) of the mean squared difference
    between the guided noise predictions of ``denoise`` and of ``reference_denoise`` (run without gradient on the same
    input), fp32, differentiable w.r.t. the parameters of ``denoise`` only.

    Args:
        denoise: ``denoise(latent_model_input, t) -> noise_pred`` for the classifier-free-guidance
            batch ``[uncond; cond]`` (2B samples); the script binds the text conditioning.
        scheduler: a diffusers DDPM/DDIM scheduler; ``set_timesteps`` is called here.
        latents: initial noise ``[B, C, h, w]`` (already scaled by ``init_noise_sigma``).
        gradient_steps: step indices that run the UNet with gradient (:func:`select_gradient_steps`).
        guidance_scale / guidance_rescale: classifier-free guidance as in diffusers' pipelines.
        detach_unet_input: detach the UNet input at gradient steps (SDXL recipe) or not (SD1.5 recipe).
        gradient_checkpointing: recompute the UNet activations of gradient steps in backward.
        attention_steps: gradient steps whose cross-attention maps are captured for Attribute
            Concentration; ``attention_capture()`` returns the context manager that turns capture on.
        generator: the sampler's noise generator (DDPM adds noise at every step), or one per sample.
        reference_denoise: the frozen model's ``denoise``, to measure how far ``denoise`` has moved from it.
        reference_min_timestep: the smallest timestep at which the gap is measured (0: every gradient step).
    """
    scheduler.set_timesteps(num_inference_steps, device=latents.device)
    timesteps = scheduler.timesteps
    gradient_steps = set(gradient_steps)
    attention_steps = set(attention_steps)
    if not attention_steps <= gradient_steps:
        raise ValueError("Attention-loss steps must be gradient steps: maps captured without gradient cannot train.")
    first_gradient_step = min(gradient_steps) if gradient_steps else num_inference_steps
    latents = latents.detach()
    reference_gaps = []

    for step_index, t in enumerate(timesteps):
        with_grad = step_index in gradient_steps
        # Before the first gradient step nothing can receive gradient: no graph at all.
        graph_context = torch.no_grad() if step_index < first_gradient_step else nullcontext()
        with graph_context:
            if with_grad:
                unet_input = latents.detach() if detach_unet_input else latents
                capture = attention_capture is not None and step_index in attention_steps
                noise_pred = _unet_with_grad(denoise, unet_input, t, scheduler, gradient_checkpointing, capture, attention_capture)
            else:
                with torch.no_grad():
                    noise_pred = _guided_noise(denoise, latents, t, scheduler)
            noise_pred = _apply_guidance(noise_pred, guidance_scale, guidance_rescale)
            if with_grad and reference_denoise is not None and t >= reference_min_timestep:
                reference_gaps.append(_reference_gap(
                    denoise, reference_denoise, latents.detach(), t, scheduler, guidance_scale, guidance_rescale,
                    noise_pred if detach_unet_input else None, gradient_checkpointing,
                ))
            latents = scheduler.step(noise_pred, t, latents, generator=generator, return_dict=False)[0]
    if reference_denoise is None:
        return latents
    reference_gap = torch.stack(reference_gaps).mean() if reference_gaps else latents.new_zeros((), dtype=torch.float32)
    return latents, reference_gap


def _guided_noise(denoise, latents, t, scheduler):
    latent_model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
    return denoise(latent_model_input, t)


def _unet_with_grad(denoise, latents, t, scheduler, gradient_checkpointing, capture, attention_capture):
    # Capture wraps the checkpointed call: maps are recorded in the forward; the recomputation in backward
    # runs outside capture (see utils.attention_capture) and so records nothing twice.
    with attention_capture() if capture else nullcontext():
        if gradient_checkpointing:
            return checkpoint(_guided_noise, denoise, latents, t, scheduler, use_reentrant=False)
        return _guided_noise(denoise, latents, t, scheduler)


def _reference_gap(denoise, reference_denoise, latents, t, scheduler, guidance_scale, guidance_rescale, noise_pred, gradient_checkpointing):
    """Mean squared gap of the guided predictions of ``denoise`` and ``reference_denoise`` at detached ``latents``.

    Its gradient must reach the parameters only: through a kept input it would also steer earlier steps to where the
    trained model's prediction meets the reference's prediction *held fixed*, which is not the gap's gradient (the
    reference moves with its input too). So ``noise_pred`` is reused only when its input was detached; otherwise the
    trained model runs again on the detached input."""
    if noise_pred is None:
        noise_pred = _apply_guidance(
            _unet_with_grad(denoise, latents, t, scheduler, gradient_checkpointing, False, None), guidance_scale, guidance_rescale
        )
    with torch.no_grad():
        reference_pred = _apply_guidance(_guided_noise(reference_denoise, latents, t, scheduler), guidance_scale, guidance_rescale)
    return (noise_pred.float() - reference_pred.float()).pow(2).mean()


def _apply_guidance(noise_pred, guidance_scale, guidance_rescale):
    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
    guided = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
    if guidance_rescale > 0.0:
        guided = rescale_noise_cfg(guided, noise_pred_text, guidance_rescale=guidance_rescale)
    return guided


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """VAE decode with gradient to an image in [0, 1] (fp32), honouring the VAE's scaling and shift factors."""
    latents = latents / vae.config.scaling_factor
    shift_factor = getattr(vae.config, "shift_factor", None)
    if shift_factor is not None:
        latents = latents + shift_factor
    image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    return (image.float() / 2 + 0.5).clamp(0, 1)


def check_unit_range(images: torch.Tensor, consumer: str) -> None:
    """Captioner and segmenter take images in [0, 1]. The reference code once fed them [-1, 1] (the SDXL
    path with the GAN on); checking at each entry point makes that bug impossible to repeat silently."""
    low, high = images.min().item(), images.max().item()
    if low < 0.0 or high > 1.0:
        raise ValueError(f"{consumer} expects images in [0, 1], got values in [{low:.3f}, {high:.3f}]: decode with decode_latents().")
