"""What does Fidelity Preservation ask of the generator? A probe of a trained discriminator in the shapes world.

CoMat's adversarial loss ``L_adv_G = BCE(D(x̂0), 1)`` is what keeps the fine-tuned model's images close to the base
model's. This probe loads the discriminator saved in a ``train_comat.py`` checkpoint and follows that loss directly,
without a generator in between (as ``reward_probe.py`` does for the captioner): the base model's samples of the
fine-tune prompts — the very latents D was trained to call real — are optimised with Adam against ``L_adv_G``, and
every few steps the exact judge reads the decoded images. It also reports D's logits on those samples at object
pixels and at background pixels of the latent: a per-pixel discriminator that scores objects lower than the
background asks the generator to paint objects over with background.

    OMP_NUM_THREADS=2 python -m benchmarks.efficacy.adversarial_probe --world_dir world \\
        --checkpoint efficacy-results/scene-oracle-d2e-5/runs/full_CoMat/checkpoint-200 --output adversarial_probe.json
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


def probe(world_dir, checkpoint, seeds=4, steps=60, learning_rate=0.01, every=10, num_inference_steps=20):
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from peft import LoraConfig

    pipeline = StableDiffusionPipeline.from_pretrained(os.path.join(world_dir, "sd"), safety_checker=None)
    pipeline.set_progress_bar_config(disable=True)
    prompts = [p for p in world.FINETUNE_PROMPTS for _ in range(seeds)]
    generators = [torch.Generator().manual_seed(s) for _ in world.FINETUNE_PROMPTS for s in range(seeds)]
    latents = pipeline(prompts, generator=generators, output_type="latent", num_inference_steps=num_inference_steps,
                       guidance_scale=GUIDANCE_SCALE).images
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
    return dict(checkpoint=checkpoint, images=len(prompts), seeds=seeds, steps=steps, learning_rate=learning_rate,
                num_inference_steps=num_inference_steps,
                discriminator_logits_on_base_samples=logit_summary, along_adversarial_loss=trajectory)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world_dir", default="world", help="The world's models (default: world).")
    parser.add_argument("--checkpoint", required=True, help="A train_comat.py checkpoint folder with the discriminator to probe.")
    parser.add_argument("--seeds", type=int, default=4, help="Samples per fine-tune prompt (default: 4).")
    parser.add_argument("--steps", type=int, default=60, help="Adam steps on the latents (default: 60).")
    parser.add_argument("--learning_rate", type=float, default=0.01, help="Adam learning rate on the latents (default: 0.01).")
    parser.add_argument("--every", type=int, default=10, help="Judge the images every N steps (default: 10).")
    parser.add_argument("--num_inference_steps", type=int, default=20, help="The run's sampling steps: the base samples use them and D sees the schedule's last timestep (default: 20, experiment.py's).")
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
                   args.num_inference_steps)
    result["seconds"] = time.perf_counter() - start
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    logits, first, last = result["discriminator_logits_on_base_samples"], result["along_adversarial_loss"][0], result["along_adversarial_loss"][-1]
    print(f"D's mean logit on the base samples: objects {logits['object_pixels']}, background "
          f"{logits['background_pixels']} ({100 * logits['object_pixel_share']:.1f}% object pixels)")
    for name in JUDGED:
        print(f"along L_adv_G, {name}: {100 * first[name]:.1f}% -> {100 * last[name]:.1f}%")
    print(args.output)


if __name__ == "__main__":
    main()
