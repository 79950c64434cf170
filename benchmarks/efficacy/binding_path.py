"""Can a gradient carry a swapped image to the right binding? The reward's landscape between a swap and the truth.

CoMat moves each sample along the gradient of its reward. Between an image that draws the prompt's colours on the
wrong objects ("a blue circle and a red square" for "a red circle and a blue square") and the true scene, a reward that
teaches binding by gradient must fall all the way. For each fine-tune prompt of a split whose two objects differ in
colour, on ``--layouts`` random layouts, this renders the swap and the true scene with the same layout and scores the
prompt along three paths between them:

- ``both at once``: the straight line in pixel space (both objects' colours blended from the swap's to the truth's);
- ``first object first``: the first object recoloured, then the second (halfway, both objects share one colour);
- ``second object first``: the other order.

Per reward and path it reports the mean loss along the path, the share of paths whose loss rises above the swap's
before it reaches the truth (a ridge a gradient step does not cross) and the ridge's mean height; and at the swap the
cosine of the descent direction (minus the gradient) with each path's first leg. The exact reward drawn in place
(``world.SceneOracle(in_place=True)``, the reward the target is met with) is always scored beside the captioners, as
the reference. On renders (no VAE), and with ``--sample_seeds`` also on the base model's own samples that the judge
reads as the swap: the straight path from each to the truth drawn where it draws its objects. With the world's VAE
also the cosine in its latent space, where the generator receives the gradient (the decoder's transpose drops what
it cannot draw): of the descent direction at the swap's latent with the way to the truth's. 1 minute per captioner.

    OMP_NUM_THREADS=2 python -m benchmarks.efficacy.binding_path --world_dir world \\
        --captioners world/blip,world/blip-adversarial-32,world/blip-hardened --output efficacy-results/binding_path.json
"""

import argparse
import json
import os

import numpy as np
import torch

from benchmarks.efficacy import world
from utils.concept_matching import CaptionScorer

EXACT_REWARD = "exact reward (in place)"
PATHS = ("both at once", "first object first", "second object first")
POINTS_PER_LEG = 6  # 0, 0.2, ..., 1 along each straight leg


def _pixels(objects, layout):
    return torch.from_numpy(world.draw(objects, layout)).permute(2, 0, 1).float()[None] / 255


def scenes(prompt, layout):
    """The swap, the two half-way scenes (one object recoloured) and the truth of ``prompt``, drawn with ``layout``."""
    first, second = world.objects_of(prompt)
    swapped_first, swapped_second = world.WorldObject(second.color, first.shape), world.WorldObject(first.color, second.shape)
    return dict(swap=_pixels([swapped_first, swapped_second], layout), first_done=_pixels([first, swapped_second], layout),
                second_done=_pixels([swapped_first, second], layout), truth=_pixels([first, second], layout))


def path_points(scene):
    """Each path of ``PATHS`` as a list of images from the swap to the truth (straight legs, POINTS_PER_LEG each)."""
    fractions = np.linspace(0, 1, POINTS_PER_LEG)

    def leg(start, end, skip_first=False):
        return [(1 - a) * start + a * end for a in fractions[int(skip_first):]]

    straight = np.linspace(0, 1, 2 * POINTS_PER_LEG - 1)
    return {
        "both at once": [(1 - a) * scene["swap"] + a * scene["truth"] for a in straight],
        "first object first": leg(scene["swap"], scene["first_done"]) + leg(scene["first_done"], scene["truth"], True),
        "second object first": leg(scene["swap"], scene["second_done"]) + leg(scene["second_done"], scene["truth"], True),
    }


def _cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def probe_scenes(prompts, layouts, seed):
    """(prompt, :func:`scenes`) for each prompt on ``layouts`` random layouts drawn with ``seed``."""
    rng = np.random.default_rng(seed)
    for prompt in prompts:
        for _ in range(layouts):
            yield prompt, scenes(prompt, world.random_layout(2, rng))


def landscape(scorer, prompts, layouts=4, seed=0):
    """What ``scorer`` (a Concept Matching scorer: ``loss(images, prompts, reduction)``) says between each prompt's
    swap and its truth: the loss along each path, ridges, and the descent direction at the swap."""
    losses = {name: [] for name in PATHS}
    cosines = {name: [] for name in PATHS}
    for prompt, scene in probe_scenes(prompts, layouts, seed):
        paths = path_points(scene)
        with torch.no_grad():
            for name, points in paths.items():
                losses[name].append([scorer.loss(x, [prompt], reduction="sum").item() for x in points])
        swap = scene["swap"].clone().requires_grad_(True)
        gradient, = torch.autograd.grad(scorer.loss(swap, [prompt], reduction="sum"), swap)
        for name, points in paths.items():  # the first leg's direction: its first step from the swap
            cosines[name].append(_cosine(-gradient, points[1] - points[0]))
    result = {}
    for name in PATHS:
        curves = np.array(losses[name])
        ridge = curves[:, 1:-1].max(axis=1) - curves[:, 0]
        result[name] = dict(mean_loss=curves.mean(axis=0).tolist(), ridge_share=float(np.mean(ridge > 0)),
                            ridge_height=float(np.clip(ridge, 0, None).mean()), cosine_at_swap=float(np.mean(cosines[name])),
                            cosine_at_swap_sd=float(np.std(cosines[name])))
    return result


def in_latents(scorer, vae, prompts, layouts=4, seed=0):
    """The cosine, in ``vae``'s latent space, of the descent direction of ``scorer`` at each swap's latent (decoded and
    scored) with the way to its truth's latent, on :func:`landscape`'s layouts (the same ``seed``)."""
    cosines = []
    for prompt, scene in probe_scenes(prompts, layouts, seed):
        with torch.no_grad():
            swap, truth = (vae.encode(scene[kind] * 2 - 1).latent_dist.mean for kind in ("swap", "truth"))
        latent = swap.clone().requires_grad_(True)
        image = (vae.decode(latent).sample / 2 + 0.5).clamp(0, 1)
        gradient, = torch.autograd.grad(scorer.loss(image, [prompt], reduction="sum"), latent)
        cosines.append(_cosine(-gradient, truth - swap))
    return dict(cosine_at_swap=float(np.mean(cosines)), cosine_at_swap_sd=float(np.std(cosines)))


def swapped_samples(world_dir, prompts, seeds, num_inference_steps=20):
    """The base model's samples of ``prompts`` (seeds 0 to ``seeds`` − 1, the experiment's sampler) that the judge
    reads as the attribute swap, each with the truth drawn where the sample draws its objects: [(prompt, sample,
    truth)], images as [1, 3, H, W] in [0, 1]."""
    from diffusers import StableDiffusionPipeline

    from benchmarks.efficacy.experiment import GUIDANCE_SCALE

    pipeline = StableDiffusionPipeline.from_pretrained(os.path.join(world_dir, "sd"), safety_checker=None)
    pipeline.set_progress_bar_config(disable=True)
    found = []
    for prompt in prompts:
        images = pipeline([prompt] * seeds, generator=[torch.Generator().manual_seed(s) for s in range(seeds)], output_type="np",
                          num_inference_steps=num_inference_steps, guidance_scale=GUIDANCE_SCALE).images
        for image in (images * 255).round().astype(np.uint8):
            if world.judge(image, world.swapped_prompt(prompt))["full_prompt"]:
                objects = world.objects_of(prompt)
                truth = _pixels(objects, world.layout_of(image, objects))
                found.append((prompt, torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255, truth))
    return found


def at_samples(scorer, samples):
    """What ``scorer`` says on the straight path from each of ``samples`` (:func:`swapped_samples`) to its truth: the
    share with a ridge, its mean height, and the cosine of the descent direction at the sample with the path."""
    if not samples:
        return None
    ridges, cosines = [], []
    for prompt, sample, truth in samples:
        with torch.no_grad():
            curve = [scorer.loss((1 - a) * sample + a * truth, [prompt], reduction="sum").item()
                     for a in np.linspace(0, 1, 2 * POINTS_PER_LEG - 1)]
        ridges.append(max(curve[1:-1]) - curve[0])
        image = sample.clone().requires_grad_(True)
        gradient, = torch.autograd.grad(scorer.loss(image, [prompt], reduction="sum"), image)
        cosines.append(_cosine(-gradient, truth - sample))
    ridges = np.array(ridges)
    return dict(samples=len(samples), ridge_share=float(np.mean(ridges > 0)), ridge_height=float(np.clip(ridges, 0, None).mean()),
                cosine_at_sample=float(np.mean(cosines)), cosine_at_sample_sd=float(np.std(cosines)))


def binding_paths(captioners, split="balanced", layouts=4, seed=0, prompts=None, world_dir=None, sample_seeds=0,
                  num_inference_steps=20):
    """:func:`landscape` of the exact in-place reward and of each captioner folder, on the split's fine-tune prompts
    whose objects differ in colour (or ``prompts``); with ``world_dir`` also :func:`in_latents` with its VAE, and with
    ``sample_seeds`` > 0 :func:`at_samples` on the base model's samples of them that draw the swap."""
    if prompts is None:
        prompts = [p for p in world.SPLITS[split][0] if world.swapped_prompt(p) != p]
    rewards = {EXACT_REWARD: world.SceneOracle(in_place=True)}
    rewards.update({captioner: CaptionScorer.from_pretrained(captioner) for captioner in captioners})
    result = dict(split=split, prompts=len(prompts), layouts=layouts, seed=seed,
                  rewards={name: landscape(scorer, prompts, layouts, seed) for name, scorer in rewards.items()})
    if world_dir is not None:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(os.path.join(world_dir, "sd"), subfolder="vae").eval().requires_grad_(False)
        result["in_latents"] = {name: in_latents(scorer, vae, prompts, layouts, seed) for name, scorer in rewards.items()}
    if sample_seeds:
        samples = swapped_samples(world_dir, prompts, sample_seeds, num_inference_steps)
        result.update(sample_seeds=sample_seeds, swapped_samples=len(samples),
                      at_samples={name: at_samples(scorer, samples) for name, scorer in rewards.items()})
    return result


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world_dir", default="world", help="The built world (benchmarks.efficacy.pretrain). Default: world.")
    parser.add_argument("--captioners", default=None, help="Comma-separated captioner folders. Default: WORLD_DIR/blip.")
    parser.add_argument("--split", default="balanced", choices=sorted(world.SPLITS), help="Whose fine-tune prompts. Default: balanced.")
    parser.add_argument("--layouts", type=int, default=4, help="Random layouts per prompt. Default: 4.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the layouts. Default: 0.")
    parser.add_argument("--sample_seeds", type=int, default=3, help="Also the straight path from each of the base model's samples (seeds 0 to N − 1 per prompt) that the judge reads as the swap to the truth drawn where it draws its objects; 0: none. Default: 3.")
    parser.add_argument("--output", default=None, help="JSON file of the results. Default: print only.")
    args = parser.parse_args(argv)
    args.captioners = args.captioners.split(",") if args.captioners else [os.path.join(args.world_dir, "blip")]
    if args.layouts < 1:
        parser.error(f"--layouts {args.layouts}: give at least 1.")
    if args.sample_seeds < 0:
        parser.error(f"--sample_seeds {args.sample_seeds}: give 0 (none) or more.")
    if not os.path.isdir(os.path.join(args.world_dir, "sd")):
        parser.error(f"--world_dir {args.world_dir}: no sd folder (the VAE and the base model the probe reads); build the world first (python -m benchmarks.efficacy.pretrain).")
    missing = [c for c in args.captioners if not os.path.isdir(c)]
    if missing:
        parser.error(f"--captioners: no captioner folder {', '.join(missing)}; build the world first (python -m benchmarks.efficacy.pretrain).")
    return args


def main(argv=None):
    args = parse_args(argv)
    results = binding_paths(args.captioners, args.split, args.layouts, args.seed, world_dir=args.world_dir, sample_seeds=args.sample_seeds)
    print(f"{results['prompts']} prompts × {results['layouts']} layouts, swap → truth")
    for reward, paths in results["rewards"].items():
        for name, entry in paths.items():
            curve = " ".join(f"{value:.2f}" for value in entry["mean_loss"])
            print(f"{reward} | {name}: ridge on {100 * entry['ridge_share']:.0f}% (height {entry['ridge_height']:.2f}), "
                  f"cosine at the swap {entry['cosine_at_swap']:+.3f} ± {entry['cosine_at_swap_sd']:.3f}; loss {curve}")
    for reward, entry in results["in_latents"].items():
        print(f"{reward} | in the VAE's latents: cosine at the swap {entry['cosine_at_swap']:+.3f} ± {entry['cosine_at_swap_sd']:.3f}")
    if args.sample_seeds:
        print(f"the base model's samples read as the swap: {results['swapped_samples']} of {results['prompts'] * args.sample_seeds}")
        for reward, entry in results["at_samples"].items():
            if entry:
                print(f"{reward} | sample → truth drawn in place: ridge on {100 * entry['ridge_share']:.0f}% (height "
                      f"{entry['ridge_height']:.2f}), cosine at the sample {entry['cosine_at_sample']:+.3f} ± {entry['cosine_at_sample_sd']:.3f}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
