"""What does Fidelity Preservation ask of the generator? A probe of a trained discriminator in the shapes world.

CoMat's adversarial loss ``L_adv_G = BCE(D(x̂0), 1)`` is what keeps the fine-tuned model's images close to the base
model's. This probe loads the discriminator saved in a ``train_comat.py`` checkpoint and follows that loss directly,
without a generator in between (as ``reward_probe.py`` does for the captioner): the base model's samples of the
fine-tune prompts — the very latents D was trained to call real — are optimised with Adam against ``L_adv_G``, and
every few steps the exact judge reads the decoded images. It also reports D's logits on those samples at object
pixels and at background pixels of the latent: a per-pixel discriminator that scores objects lower than the
background asks the generator to paint objects over with background.

And where the checkpoint's generator stands: for the base model's samples, the VAE latents of the true renders of the
same prompts, and the samples of the checkpoint's LoRA (same seeds), the share of latent pixels D calls real, and
their latent statistics — mean |z|, per-channel mean and SD, and the round-trip error of decoding and re-encoding them
with the world's VAE (how far they are from the latents the VAE itself makes; the base model's samples: 0.14).

    OMP_NUM_THREADS=2 python -m benchmarks.efficacy.adversarial_probe --world_dir world \\
        --checkpoint efficacy-results/scene-oracle-d2e-5/runs/full_CoMat/checkpoint-200 --output adversarial_probe.json
    # a balanced-split run: --split balanced (the split's fine-tune prompts)
"""

import argparse
import json
import logging
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.efficacy import world
from benchmarks.efficacy.experiment import WorldJudgeScorer
from benchmarks.efficacy.pretrain import encode_means, images_to_tensor
from benchmarks.efficacy.reward_probe import decoded_images
from utils.fidelity_preservation import DISCRIMINATOR_CONFIG_NAME, UNetDiscriminator, generator_adversarial_loss

logger = logging.getLogger(__name__)
GUIDANCE_SCALE = 7.5


JUDGED = ("full_prompt_accuracy", "all_shapes_drawn", "parsed", "background_cleanliness")


def _read(arrays, prompts):
    """The experiment's judge scores (``WorldJudgeScorer``) that the probe follows, as shares of the images."""
    scores = WorldJudgeScorer().score(list(arrays), prompts)
    return {name: float(np.mean([score[name] for score in scores])) for name in JUDGED}


def _object_pixels(arrays, latent_side):
    """``[B, latent_side, latent_side]`` bool: latent pixels whose image area is mostly the judge's objects."""
    masks = np.zeros(arrays.shape[:3], dtype=np.float32)
    for index, image in enumerate(arrays):
        for component in world.parse_image(image):
            masks[index][component.pixels] = 1.0
    coverage = F.interpolate(torch.from_numpy(masks)[:, None], size=(latent_side, latent_side), mode="area")[:, 0]
    return coverage >= 0.5


@torch.no_grad()
def latent_statistics(vae, latents):
    """Mean |z|, per-channel mean and SD, and the RMS round-trip error of decoding and re-encoding ``latents`` (the
    encoder's mean; SD's scaled latent space)."""
    round_trip = encode_means(vae, decoded_images(vae, latents)[0]) * vae.config.scaling_factor
    return dict(mean_abs=float(latents.abs().mean()), channel_mean=latents.mean(dim=(0, 2, 3)).tolist(),
                channel_sd=latents.std(dim=(0, 2, 3)).tolist(), round_trip_error=float((round_trip - latents).pow(2).mean().sqrt()))


def render_latents(vae, prompts, seed=0):
    """The VAE latents (encoder mean, scaled) of one true render per entry of ``prompts``."""
    rng = np.random.default_rng(seed)
    images = [world.render(world.objects_of(prompt), rng) for prompt in prompts]
    return encode_means(vae, images_to_tensor(images)) * vae.config.scaling_factor


def probe(world_dir, checkpoint, seeds=4, steps=60, learning_rate=0.01, every=10, num_inference_steps=20, split="hash"):
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from peft import LoraConfig

    def sample(pipeline):
        generators = [torch.Generator().manual_seed(s) for _ in finetune_prompts for s in range(seeds)]
        return pipeline(prompts, generator=generators, output_type="latent", num_inference_steps=num_inference_steps,
                        guidance_scale=GUIDANCE_SCALE).images

    pipeline = StableDiffusionPipeline.from_pretrained(os.path.join(world_dir, "sd"), safety_checker=None)
    pipeline.set_progress_bar_config(disable=True)
    finetune_prompts = world.SPLITS[split][0]
    prompts = [p for p in finetune_prompts for _ in range(seeds)]
    latents = sample(pipeline)
    fine_tuned = StableDiffusionPipeline.from_pretrained(os.path.join(world_dir, "sd"), safety_checker=None)
    fine_tuned.set_progress_bar_config(disable=True)
    fine_tuned.load_lora_weights(checkpoint)
    compared = {"base samples": latents, "true renders": render_latents(pipeline.vae, prompts), "LoRA samples": sample(fine_tuned)}
    del fine_tuned
    vae, unet = pipeline.vae.requires_grad_(False), pipeline.unet.requires_grad_(False)

    with open(os.path.join(checkpoint, DISCRIMINATOR_CONFIG_NAME)) as f:
        config = json.load(f)
    # D is an adapter next to the generator's on the same UNet, as in training; an untrained generator adapter is
    # the identity (LoRA B starts at zero) and D's calls switch to D's own adapter anyway.
    unet.add_adapter(LoraConfig(r=config["rank"], lora_alpha=config["lora_alpha"], target_modules=config["target_modules"]))
    discriminator = UNetDiscriminator.from_unet(unet, config["rank"], config["lora_alpha"])
    discriminator.load(checkpoint)
    scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    scheduler.set_timesteps(num_inference_steps)
    final_timestep = scheduler.timesteps[-1]
    with torch.no_grad():
        empty_prompt = pipeline.encode_prompt([""] * len(prompts), "cpu", 1, False)[0]

    def logits(z):
        return discriminator(z, final_timestep, empty_prompt)[:, 0]

    with torch.no_grad():
        base_arrays = decoded_images(vae, latents)[1]
        base_logits = logits(latents)
    objects = _object_pixels(base_arrays, latents.shape[-1])
    logit_summary = dict(  # a mean over no pixel (no object drawn at all, or nothing else) is None
        object_pixels=float(base_logits[objects].mean()) if objects.any() else None,
        background_pixels=float(base_logits[~objects].mean()) if (~objects).any() else None,
        object_pixel_share=float(objects.float().mean()), real_accuracy=float((base_logits.mean(dim=(1, 2)) > 0).float().mean()),
    )
    logger.info(f"D's logits on the base samples: {logit_summary}")
    with torch.no_grad():
        real_share = {name: float((logits(z) > 0).float().mean()) for name, z in compared.items()}
    latents_summary = {name: latent_statistics(vae, z) for name, z in compared.items()}
    logger.info(f"Share of latent pixels D calls real: {real_share}; latents: {latents_summary}")

    optimised = latents.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([optimised], lr=learning_rate)
    trajectory = [dict(step=0, adversarial_loss=float(generator_adversarial_loss(base_logits)), **_read(base_arrays, prompts))]
    for step in range(1, steps + 1):
        loss = generator_adversarial_loss(logits(optimised))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % every == 0:
            with torch.no_grad():
                trajectory.append(dict(step=step, adversarial_loss=loss.item(), **_read(decoded_images(vae, optimised)[1], prompts)))
            logger.info(f"along L_adv_G: {trajectory[-1]}")
    return dict(checkpoint=checkpoint, split=split, images=len(prompts), seeds=seeds, steps=steps, learning_rate=learning_rate,
                num_inference_steps=num_inference_steps, discriminator_logits_on_base_samples=logit_summary,
                discriminator_real_share=real_share, latents=latents_summary, along_adversarial_loss=trajectory)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world_dir", default="world", help="The world's models (default: world).")
    parser.add_argument("--checkpoint", required=True, help="A train_comat.py checkpoint folder with the discriminator to probe.")
    parser.add_argument("--seeds", type=int, default=4, help="Samples per fine-tune prompt (default: 4).")
    parser.add_argument("--steps", type=int, default=60, help="Adam steps on the latents (default: 60).")
    parser.add_argument("--learning_rate", type=float, default=0.01, help="Adam learning rate on the latents (default: 0.01).")
    parser.add_argument("--every", type=int, default=10, help="Judge the images every N steps (default: 10).")
    parser.add_argument("--num_inference_steps", type=int, default=20, help="The run's sampling steps: the base samples use them and D sees the schedule's last timestep (default: 20, experiment.py's).")
    parser.add_argument("--split", choices=list(world.SPLITS), default="hash", help="Whose fine-tune prompts to sample: experiment.py's --split (default: hash).")
    parser.add_argument("--output", default="adversarial_probe.json", help="Where the results are written (JSON).")
    args = parser.parse_args(argv)
    if not os.path.isdir(os.path.join(args.world_dir, "sd")):
        parser.error(f"--world_dir {args.world_dir} has no sd/ model: build the world first (python -m benchmarks.efficacy.pretrain --world_dir {args.world_dir}).")
    if not os.path.isfile(os.path.join(args.checkpoint, DISCRIMINATOR_CONFIG_NAME)):
        parser.error(f"--checkpoint {args.checkpoint} has no {DISCRIMINATOR_CONFIG_NAME}: pass a checkpoint-N folder of a "
                     "train_comat.py run with Fidelity Preservation on.")
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO)
    start = time.perf_counter()
    result = probe(args.world_dir, args.checkpoint, args.seeds, args.steps, args.learning_rate, args.every,
                   args.num_inference_steps, args.split)
    result["seconds"] = time.perf_counter() - start
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    logits, first, last = result["discriminator_logits_on_base_samples"], result["along_adversarial_loss"][0], result["along_adversarial_loss"][-1]
    print(f"D's mean logit on the base samples: objects {logits['object_pixels']}, background "
          f"{logits['background_pixels']} ({100 * logits['object_pixel_share']:.1f}% object pixels)")
    for name, share in result["discriminator_real_share"].items():
        statistics = result["latents"][name]
        print(f"{name}: D calls {100 * share:.1f}% of latent pixels real; mean |z| {statistics['mean_abs']:.3f}, "
              f"round-trip error {statistics['round_trip_error']:.3f}")
    for name in JUDGED:
        print(f"along L_adv_G, {name}: {100 * first[name]:.1f}% -> {100 * last[name]:.1f}%")
    print(args.output)


if __name__ == "__main__":
    main()
