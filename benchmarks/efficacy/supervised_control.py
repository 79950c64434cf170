"""The supervised control: what can training on the fine-tune prompts teach the held-out ones at all?

CoMat trains on its own samples of the fine-tune prompts, pulled by a reward. The best any reward could do is pull
them towards the world's true scenes of those prompts. This script trains that directly: a LoRA on CoMat's
layers (rank 8 as CoMat's, or ``--rank``) on the base UNet with the plain denoising loss on the world's renders of the fine-tune
prompts (images CoMat never gets), then evaluates it on the held-out prompts exactly as ``experiment.py`` evaluates
CoMat (same prompts, seeds, sampler, judge and tables). If this moves held-out accuracy little, no reward trained
on these prompts can move it more through this LoRA; if it moves it a lot, the reward is what CoMat lacks.

    OMP_NUM_THREADS=2 python -m benchmarks.efficacy.supervised_control --world_dir world --output_dir efficacy-results/supervised
    python -m benchmarks.efficacy.supervised_control --quick --world_dir /tmp/w --output_dir /tmp/s   # mechanics only
"""

import argparse
import json
import logging
import os
import time

import numpy as np
import torch

from benchmarks.efficacy import world
from benchmarks.efficacy.experiment import (FINETUNE_PROMPT_SETS, GUIDANCE_SCALE, SETTINGS, WorldJudgeScorer, fidelity,
                                            finetune_prompts_of, markdown)
from benchmarks.efficacy.pretrain import CONDITION_DROPOUT, build_world, denoising_loss, descend, encode_means, images_to_tensor
from utils import evaluation
from utils.training import LORA_TARGET_MODULES, lora_config, lora_metadata, parse_lora_layers, unet_lora_state_dict

logger = logging.getLogger(__name__)

RECIPES = {
    "full": dict(save_steps=(250, 1000), batch_size=32, renders_per_prompt=64),
    "quick": dict(save_steps=(2,), batch_size=4, renders_per_prompt=2),
}


def encode_renders(pipeline, prompts, renders_per_prompt, seed):
    """VAE latents of ``renders_per_prompt`` random renders of each prompt, and each render's prompt."""
    rng = np.random.default_rng(seed)
    scene_prompts = [prompt for prompt in prompts for _ in range(renders_per_prompt)]
    images = images_to_tensor([world.render(world.objects_of(prompt), rng) for prompt in scene_prompts])
    return encode_means(pipeline.vae, images) * pipeline.vae.config.scaling_factor, scene_prompts


def train_lora(pipeline, prompts, output_dir, save_steps, batch_size, renders_per_prompt, learning_rate, rank, seed,
               lora_layers=LORA_TARGET_MODULES):
    """A UNet LoRA of ``rank`` on ``lora_layers`` trained on renders of ``prompts`` with the denoising loss; saved at
    each of ``save_steps``. Returns the LoRA folders by step and the mean loss of the first and last 50 steps."""
    from diffusers import DDPMScheduler

    generator = torch.Generator().manual_seed(seed)
    latents, scene_prompts = encode_renders(pipeline, prompts, renders_per_prompt, seed)
    distinct = sorted(set(scene_prompts))
    with torch.no_grad():
        ids = pipeline.tokenizer(distinct + [""], padding="max_length", max_length=pipeline.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
        embeddings = pipeline.text_encoder(ids)[0]
    prompt_index = torch.tensor([distinct.index(prompt) for prompt in scene_prompts])
    empty = len(distinct)
    scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    unet = pipeline.unet.requires_grad_(False)
    torch.manual_seed(seed)  # peft draws the LoRA's initial weights from the global generator
    unet.add_adapter(lora_config(rank, target_modules=lora_layers))
    parameters = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=1e-2)
    folders, losses = {}, []
    start = time.perf_counter()
    for step in range(1, max(save_steps) + 1):
        index = torch.randint(len(latents), (batch_size,), generator=generator)
        dropped = torch.rand(batch_size, generator=generator) < CONDITION_DROPOUT
        conditions = embeddings[torch.where(dropped, torch.full_like(index, empty), prompt_index[index])]
        loss = denoising_loss(unet, scheduler, latents[index], conditions, generator)
        descend(loss, optimizer, clip=parameters)
        losses.append(loss.item())
        if step % 250 == 0:
            logger.info(f"step {step}: loss {np.mean(losses[-250:]):.4f} ({time.perf_counter() - start:.0f} s)")
        if step in save_steps:
            folders[step] = os.path.join(output_dir, f"lora-{step}")
            type(pipeline).save_lora_weights(folders[step], unet_lora_layers=unet_lora_state_dict(unet),
                                             unet_lora_adapter_metadata=lora_metadata(unet))
    return folders, {"first": float(np.mean(losses[:50])), "last": float(np.mean(losses[-50:]))}


def run(args):
    from diffusers import StableDiffusionPipeline

    recipe = "quick" if args.quick else "full"
    settings = dict(RECIPES[recipe], **{k: SETTINGS["quick" if args.quick else "main"][k] for k in ("num_inference_steps", "seeds")})
    start = time.perf_counter()
    build_world(args.world_dir, recipe)
    finetune_prompts = finetune_prompts_of(args.finetune_prompts, args.split)

    def load_pipeline():
        pipeline = StableDiffusionPipeline.from_pretrained(os.path.join(args.world_dir, "sd"), safety_checker=None)
        pipeline.set_progress_bar_config(disable=True)
        return pipeline

    folders, loss = train_lora(load_pipeline(), finetune_prompts, args.output_dir, settings["save_steps"], settings["batch_size"],
                               settings["renders_per_prompt"], args.learning_rate, args.rank, seed=0,
                               lora_layers=parse_lora_layers(args.lora_layers))
    train_seconds = time.perf_counter() - start
    models = {"base": None, **{f"supervised @ {step}": folder for step, folder in folders.items()}}

    pipeline = load_pipeline()
    call = dict(num_inference_steps=settings["num_inference_steps"], guidance_scale=GUIDANCE_SCALE)
    seeds = list(range(settings["seeds"]))
    scorer = WorldJudgeScorer()
    results = dict(settings=settings, learning_rate=args.learning_rate, rank=args.rank, lora_layers=args.lora_layers, finetune_prompt_set=args.finetune_prompts,
                   split=args.split, finetune_prompts=len(finetune_prompts), loss=loss)
    table = ""
    for half, prompts in (("held-out", world.SPLITS[args.split][1]), ("fine-tune", [p for p in finetune_prompts if " and " in p])):
        prompts = prompts[: 2 if args.quick else None]
        generations = evaluation.generate(pipeline, models, prompts, seeds, **call)
        evaluation.score(generations, scorer)
        summary = evaluation.summarize(generations, baseline="base")
        fidelity_by_model, _ = fidelity(generations, prompts, seeds)
        results[half] = dict(prompts=prompts, summary=summary, fidelity=fidelity_by_model)
        table += f"\n**{half} prompts** ({len(prompts)} × {len(seeds)} seeds)\n\n" + markdown(summary, fidelity_by_model, "base")
    results["seconds"] = dict(train=train_seconds, total=time.perf_counter() - start)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(table)
    print(table)
    print(f"denoising loss {loss['first']:.4f} → {loss['last']:.4f}; {results['seconds']}")
    return results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world_dir", default="world", help="The world's models (built there when missing).")
    parser.add_argument("--output_dir", default="efficacy-results/supervised", help="LoRAs and results.")
    parser.add_argument("--quick", action="store_true", help="A few steps and images: the mechanics, not the result.")
    parser.add_argument("--learning_rate", type=float, default=1e-4, help="LoRA learning rate (default: 1e-4, CoMat's).")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank (default: 8, the CoMat fine-tunes').")
    parser.add_argument("--lora_layers", default=",".join(LORA_TARGET_MODULES), help="UNet layers with the LoRA, as train_comat.py's flag (default: every attention projection).")
    parser.add_argument("--finetune_prompts", choices=FINETUNE_PROMPT_SETS, default="held-out-pairs",
                        help="The prompts whose renders it trains on, as experiment.py's flag (default: held-out-pairs).")
    parser.add_argument("--split", choices=list(world.SPLITS), default="hash", help="The prompt split, as experiment.py's flag (default: hash).")
    return parser.parse_args(argv)


def main(argv=None):
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO)
    run(parse_args(argv))


if __name__ == "__main__":
    main()
