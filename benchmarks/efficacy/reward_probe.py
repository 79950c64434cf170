"""Does the captioner's gradient point towards the prompt? A bound on what CoMat can gain in the shapes world.

CoMat moves the generator along the gradient of the caption loss through the decoded image. This probe follows
that gradient directly, without a generator in between: the base model's samples of the evaluation prompts are
decoded from latents that Adam optimises against the caption loss (``CaptionScorer``, through the VAE decoder),
once towards each sample's prompt and once towards its attribute-swapped prompt ("a red circle and a blue square"
→ "a blue circle and a red square"). Every few steps the exact judge reads the images; at the end it counts, per
pair of colours, the samples that the gradient towards the prompt rebinds.

A captioner whose gradient carries binding information raises full-prompt accuracy towards the prompt and
swapped-prompt accuracy towards the swap; a merely hackable one lowers both (or moves both alike), and then no
generator trained on that gradient can bind better.

    OMP_NUM_THREADS=1 python -m benchmarks.efficacy.reward_probe --world_dir world --output reward_probe.json
"""

import argparse
import json
import logging
import os
import time

import numpy as np
import torch

from benchmarks.efficacy import world
from utils.concept_matching import CaptionScorer

logger = logging.getLogger(__name__)


def decoded_images(vae, latents):
    """Decoded latents as (differentiable [B, 3, H, W] in [0, 1], uint8 arrays for the judge)."""
    pixels = (vae.decode(latents / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    arrays = (pixels.detach().permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    return pixels, arrays


def _read(arrays, prompts):
    """Share of images the judge reads as their prompt, as the swapped prompt, and their background cleanliness."""
    return dict(
        prompt_accuracy=float(np.mean([world.judge(a, p)["full_prompt"] for a, p in zip(arrays, prompts)])),
        swapped_accuracy=float(np.mean([world.judge(a, world.swapped_prompt(p))["full_prompt"] for a, p in zip(arrays, prompts)])),
        background_cleanliness=float(np.mean([world.background_cleanliness(a) for a in arrays])),
    )


def by_color_pair(prompts, before, after):
    """Towards the prompt, per pair of colours the prompt names: samples, read as the prompt before and after, and
    drawn as the swap before."""
    pairs = {}
    for prompt, image_before, image_after in zip(prompts, before, after, strict=True):
        key = "–".join(sorted(obj.color for obj in world.objects_of(prompt)))
        entry = pairs.setdefault(key, dict(samples=0, prompt_before=0, prompt_after=0, swap_before=0))
        entry["samples"] += 1
        entry["prompt_before"] += int(world.judge(image_before, prompt)["full_prompt"])
        entry["prompt_after"] += int(world.judge(image_after, prompt)["full_prompt"])
        entry["swap_before"] += int(world.judge(image_before, world.swapped_prompt(prompt))["full_prompt"])
    return dict(sorted(pairs.items()))


def probe(world_dir, captioner, seeds=3, steps=60, learning_rate=0.01, reduction="sum", every=10, prompt_set="evaluation",
          split="hash"):
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(os.path.join(world_dir, "sd"), safety_checker=None)
    pipeline.set_progress_bar_config(disable=True)
    scorer = CaptionScorer.from_pretrained(captioner)
    vae = pipeline.vae.requires_grad_(False)
    finetune_prompts, evaluation_prompts = world.SPLITS[split]
    source = evaluation_prompts if prompt_set == "evaluation" else finetune_prompts
    distinct_colors = [p for p in source if world.swapped_prompt(p) != p]
    prompts = [p for p in distinct_colors for _ in range(seeds)]
    seed_list = [s for _ in distinct_colors for s in range(seeds)]
    latents = pipeline(prompts, generator=[torch.Generator().manual_seed(s) for s in seed_list], output_type="latent",
                       num_inference_steps=20, guidance_scale=7.5).images
    with torch.no_grad():
        base_arrays = decoded_images(vae, latents)[1]
        base = _read(base_arrays, prompts)
    logger.info(f"base samples: {base}")
    trajectories = {}
    for target in ("prompt", "swapped"):
        targets = prompts if target == "prompt" else [world.swapped_prompt(p) for p in prompts]
        optimised = latents.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([optimised], lr=learning_rate)
        trajectory = [dict(step=0, **base)]
        for step in range(1, steps + 1):
            pixels, arrays = decoded_images(vae, optimised)
            loss = scorer.loss(pixels, targets, reduction=reduction)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % every == 0:
                with torch.no_grad():
                    trajectory.append(dict(step=step, caption_loss=loss.item(), **_read(decoded_images(vae, optimised)[1], prompts)))
                logger.info(f"towards the {target}: {trajectory[-1]}")
        trajectories[target] = trajectory
        if target == "prompt":
            with torch.no_grad():
                pairs = by_color_pair(prompts, base_arrays, decoded_images(vae, optimised)[1])
    return dict(captioner=captioner, prompt_set=prompt_set, split=split, images=len(prompts), seeds=seeds, steps=steps,
                learning_rate=learning_rate, reduction=reduction, base=base, towards=trajectories, towards_prompt_by_color_pair=pairs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world_dir", default="world", help="The world's models (default: world).")
    parser.add_argument("--captioner", default=None, help="Captioner folder to probe (default: WORLD_DIR/blip).")
    parser.add_argument("--seeds", type=int, default=3, help="Samples per evaluation prompt (default: 3).")
    parser.add_argument("--steps", type=int, default=60, help="Adam steps on the latents (default: 60).")
    parser.add_argument("--learning_rate", type=float, default=0.01, help="Adam learning rate on the latents (default: 0.01).")
    parser.add_argument("--reduction", choices=["mean", "sum"], default="sum", help="Caption loss reduction (default: sum).")
    parser.add_argument("--every", type=int, default=10, help="Judge the images every N steps (default: 10).")
    parser.add_argument("--prompt_set", choices=["evaluation", "finetune"], default="evaluation", help="The held-out evaluation prompts or the fine-tune prompts, those whose objects differ in colour (default: evaluation).")
    parser.add_argument("--split", choices=list(world.SPLITS), default="hash", help="Whose halves --prompt_set names, as experiment.py's flag (default: hash).")
    parser.add_argument("--output", default="reward_probe.json", help="Where the trajectories are written (JSON).")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO)
    start = time.perf_counter()
    result = probe(args.world_dir, args.captioner or os.path.join(args.world_dir, "blip"), args.seeds, args.steps,
                   args.learning_rate, args.reduction, args.every, args.prompt_set, args.split)
    result["seconds"] = time.perf_counter() - start
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    for target, trajectory in result["towards"].items():
        last = trajectory[-1]
        print(f"towards the {target}: prompt accuracy {100 * result['base']['prompt_accuracy']:.1f}% -> "
              f"{100 * last['prompt_accuracy']:.1f}%, swapped {100 * result['base']['swapped_accuracy']:.1f}% -> "
              f"{100 * last['swapped_accuracy']:.1f}%, background {100 * last['background_cleanliness']:.1f}%")
    for pair, entry in result["towards_prompt_by_color_pair"].items():
        print(f"towards the prompt, {pair}: read as the prompt {entry['prompt_before']}/{entry['samples']} -> "
              f"{entry['prompt_after']}/{entry['samples']} (drawn as the swap before: {entry['swap_before']})")
    print(args.output)


if __name__ == "__main__":
    main()
