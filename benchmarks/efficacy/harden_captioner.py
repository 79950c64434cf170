"""Harden the world's captioner against the images that satisfy it off the world's manifold.

A generator trained on a captioner's loss finds images the captioner reads as the prompt and the judge cannot (README,
ninth session: bars of mixed colour, the second object faint or gone) before it learns to bind. This fine-tunes the
captioner, in rounds, on such images of the generator's own: each round samples the base model on the fine-tune
prompts of the split (never the evaluation prompts), moves each sample's latents along the *current* captioner's
gradient towards its prompt (Adam on the latents through the VAE decoder, as the reward probe does, with larger steps:
what a generator trained on the captioner does), and has the world's annotator — the judge — caption what each image
shows: every object it finds, left to right, "a smudge" for one whose colour or shape it cannot name, "nothing" for an
empty image. The unattacked samples are captioned too, so the captioner also learns the generator's own swapped
bindings. The captioner then trains on all images captioned so far, half of each batch, beside the world's renders
(augmented as in pretraining). ``--generator_loras`` adds, before the first round, the samples of fine-tuned LoRAs
(e.g. the checkpoints of a CoMat run that hacked the captioner), captioned the same way: the generator's hacks
themselves, one turn of training captioner and generator in turn.

This is how a reward model is refreshed with human labels of the policy's samples; here the judge plays the human,
so the hardened captioner's reward is no longer independent of the evaluation's judge (README).

    OMP_NUM_THREADS=2 python -m benchmarks.efficacy.harden_captioner --world_dir world --split balanced \
        --output world/blip-hardened [--generator_loras RUN/checkpoint-100,RUN/checkpoint-200]
"""

import argparse
import json
import logging
import os
import time

import numpy as np
import torch

from benchmarks.efficacy import world
from benchmarks.efficacy.judge_agreement import SEEDS, judge_agreement
from benchmarks.efficacy.pretrain import CAPTION_PREFIX, augment, dataset, images_to_tensor, reconstruct, swap_preference
from benchmarks.efficacy.reward_probe import decoded_images
from utils import evaluation
from utils.concept_matching import CaptionScorer, caption_nll

logger = logging.getLogger(__name__)

UNNAMED_OBJECT = "a smudge"
EMPTY_IMAGE = "nothing"
MAX_CAPTIONED_OBJECTS = 4  # more components than this are captioned as their first four (left to right)
# prompts: how many of the split's fine-tune and evaluation prompts are used (None: all).
RECIPES = {
    "full": dict(rounds=6, seeds_per_round=2, attack_steps=40, attack_learning_rate=0.05, snapshots=(10, 20, 40),
                 train_steps_per_round=80, batch_size=64, learning_rate=2e-4, dataset_size=8000, check_images=200,
                 agreement_seeds=4, prompts=None),
    "quick": dict(rounds=1, seeds_per_round=1, attack_steps=2, attack_learning_rate=0.05, snapshots=(2,),
                  train_steps_per_round=2, batch_size=4, learning_rate=2e-4, dataset_size=8, check_images=4,
                  agreement_seeds=1, prompts=2),
}


def annotate(image):
    """The caption of an ``[H, W, 3]`` uint8 image in the world's form, from what the judge finds in it."""
    found = world.parse_image(image)[:MAX_CAPTIONED_OBJECTS]
    if not found:
        return EMPTY_IMAGE
    return " and ".join(
        UNNAMED_OBJECT if "unknown" in (c.color, c.shape) else world.WorldObject(c.color, c.shape).phrase for c in found
    )


def attacked_samples(pipeline, scorer, prompts, seeds, steps, learning_rate, snapshots, num_inference_steps=20):
    """The base model's samples of ``prompts`` and their latents moved towards the captioner's loss of the prompt:
    (uint8 images, the prompt each was made for, the attack step it was taken at)."""
    latents = pipeline(prompts, generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="latent",
                       num_inference_steps=num_inference_steps, guidance_scale=7.5).images
    vae = pipeline.vae
    with torch.no_grad():
        images, made_for, taken_at = list(decoded_images(vae, latents)[1]), list(prompts), [0] * len(prompts)
    optimised = latents.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([optimised], lr=learning_rate)
    for step in range(1, steps + 1):
        loss = scorer.loss(decoded_images(vae, optimised)[0], prompts, reduction="sum")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step in snapshots:
            with torch.no_grad():
                images += list(decoded_images(vae, optimised)[1])
            made_for += prompts
            taken_at += [step] * len(prompts)
    return images, made_for, taken_at


def read_as_prompt(images, made_for):
    """Share of images the judge reads as the prompt they were made for, and share it parses."""
    verdicts = [world.judge(image, prompt) for image, prompt in zip(images, made_for)]
    return float(np.mean([v["full_prompt"] for v in verdicts])), float(np.mean([v["parsed"] for v in verdicts]))


def harden(world_dir, captioner, output, split="balanced", recipe="full", generator_loras=(), lora_seeds=4, seed=11):
    """Fine-tunes ``captioner`` in rounds on the judge's captions of attacked samples and of ``lora_seeds`` samples
    per fine-tune prompt of each of ``generator_loras`` (module docstring), saves it to ``output`` with
    ``hardening.json`` (per round: how far the attack got; per LoRA: its samples; both read by the judge; before and
    after: ``judge_agreement`` on the base model's and those LoRAs' samples of the split's evaluation prompts, never
    trained on), and returns that summary."""
    from diffusers import StableDiffusionPipeline
    from transformers import BlipForConditionalGeneration, BlipProcessor

    settings = RECIPES[recipe]
    model = BlipForConditionalGeneration.from_pretrained(captioner)
    processor = BlipProcessor.from_pretrained(captioner)
    size = processor.image_processor.size
    scorer = CaptionScorer(model, processor.tokenizer, (size["height"], size["width"]), processor.image_processor.image_mean,
                           processor.image_processor.image_std, prefix=CAPTION_PREFIX)
    pipeline = StableDiffusionPipeline.from_pretrained(os.path.join(world_dir, "sd"), safety_checker=None)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.vae.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    renders, render_captions = dataset(world.captioner_sample, settings["dataset_size"], seed)
    reconstructions = reconstruct(pipeline.vae, renders)
    finetune_prompts, evaluation_prompts = (half[: settings["prompts"]] for half in world.SPLITS[split])
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings["learning_rate"], weight_decay=1e-2)
    pool_images, pool_captions, rounds, lora_samples = [], [], [], {}
    held_out = evaluation.generate(pipeline, {"base": None, **{lora: lora for lora in generator_loras}}, evaluation_prompts,
                                   list(SEEDS[: settings["agreement_seeds"]]), show_progress=False,
                                   num_inference_steps=20, guidance_scale=7.5)
    agreement_before = judge_agreement(scorer, held_out)
    generations = evaluation.generate(pipeline, {lora: lora for lora in generator_loras}, finetune_prompts,
                                      [2000 + s for s in range(lora_seeds)], show_progress=False, num_inference_steps=20,
                                      guidance_scale=7.5)
    for lora, generation in generations.items():
        accuracy, parsed = read_as_prompt(generation.images, generation.prompts)
        lora_samples[lora] = dict(images=len(generation.images), read_as_prompt=accuracy, parsed=parsed)
        pool_images += generation.images
        pool_captions += [annotate(image) for image in generation.images]
    half = settings["batch_size"] // 2
    for round_index in range(settings["rounds"]):
        start = time.perf_counter()
        model.eval().requires_grad_(False)
        prompts = [p for p in finetune_prompts for _ in range(settings["seeds_per_round"])]
        seeds = [1000 * (round_index + 1) + s for _ in finetune_prompts for s in range(settings["seeds_per_round"])]
        images, made_for, taken_at = attacked_samples(pipeline, scorer, prompts, seeds, settings["attack_steps"],
                                                      settings["attack_learning_rate"], settings["snapshots"])
        last = [i for i, step in enumerate(taken_at) if step == max(taken_at)]
        accuracy, parsed = read_as_prompt([images[i] for i in last], [made_for[i] for i in last])
        captions = [annotate(image) for image in images]
        pool_images += images
        pool_captions += captions
        pool = images_to_tensor(pool_images)
        model.train().requires_grad_(True)
        for _ in range(settings["train_steps_per_round"]):
            real = torch.randint(len(render_captions), (half,), generator=generator).tolist()
            hard = torch.randint(len(pool_captions), (half,), generator=generator).tolist()
            pixels = torch.cat([augment(renders[real], reconstructions[real], generator), pool[hard]])
            input_ids, attention_mask, labels = scorer.tokenize([render_captions[i] for i in real] + [pool_captions[i] for i in hard])
            logits = model(pixel_values=scorer.preprocess(pixels), input_ids=input_ids, attention_mask=attention_mask).logits
            loss = caption_nll(logits, labels, "sum")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        rounds.append(dict(round=round_index, attack_read_as_prompt=accuracy, attack_parsed=parsed,
                           captioned_as_the_prompt=float(np.mean([c == p for c, p in zip(captions, made_for)])),
                           pool=len(pool_captions), last_loss=loss.item(), seconds=time.perf_counter() - start))
        logger.info(f"hardening round {round_index}: {rounds[-1]}")
    model.eval().requires_grad_(False)
    model.save_pretrained(output)
    processor.save_pretrained(output)
    summary = dict(captioner=captioner, split=split, recipe=recipe, settings=settings, seed=seed, rounds=rounds,
                   generator_loras=lora_samples, judge_agreement=dict(before=agreement_before, after=judge_agreement(scorer, held_out)),
                   prefers_true_caption=swap_preference(model, processor, num_images=settings["check_images"]))
    with open(os.path.join(output, "hardening.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world_dir", default="world", help="The world's models (default: world; build it with pretrain.py).")
    parser.add_argument("--captioner", default=None, help="Captioner to harden (default: WORLD_DIR/blip).")
    parser.add_argument("--split", choices=list(world.SPLITS), default="balanced", help="Whose fine-tune prompts are attacked, as experiment.py's flag (default: balanced).")
    parser.add_argument("--output", default=None, help="Folder of the hardened captioner (default: WORLD_DIR/blip-hardened).")
    parser.add_argument("--generator_loras", default="", help="Comma-separated LoRA folders (e.g. checkpoints of a CoMat run) whose samples of the fine-tune prompts are captioned by the judge and trained on too (default: none).")
    parser.add_argument("--lora_seeds", type=int, default=4, help="Samples per fine-tune prompt of each of those LoRAs (default: 4).")
    parser.add_argument("--quick", action="store_true", help="One tiny round: checks the mechanics only.")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO)
    captioner = args.captioner or os.path.join(args.world_dir, "blip")
    for folder, flag in ((os.path.join(args.world_dir, "sd"), "--world_dir"), (captioner, "--captioner")):
        if not os.path.isdir(folder):
            parser.error(f"{flag}: no model folder {folder}; build the world first: "
                         f"python -m benchmarks.efficacy.pretrain --world_dir {args.world_dir}")
    loras = [lora.strip() for lora in args.generator_loras.split(",") if lora.strip()]
    for lora in loras:
        if not os.path.isfile(os.path.join(lora, "pytorch_lora_weights.safetensors")):
            parser.error(f"--generator_loras: no pytorch_lora_weights.safetensors in {lora}; pass a train_comat.py "
                         "output folder or one of its checkpoint-N folders.")
    torch.set_flush_denormal(True)
    summary = harden(args.world_dir, captioner, args.output or os.path.join(args.world_dir, "blip-hardened"), args.split,
                     "quick" if args.quick else "full", loras, args.lora_seeds)
    for lora, entry in summary["generator_loras"].items():
        print(f"{lora}: samples read as the prompt {100 * entry['read_as_prompt']:.1f}%, parsed {100 * entry['parsed']:.1f}%")
    for entry in summary["rounds"]:
        print(f"round {entry['round']}: the attack's images read as the prompt {100 * entry['attack_read_as_prompt']:.1f}%, "
              f"parsed {100 * entry['attack_parsed']:.1f}%")
    for when, agreement in summary["judge_agreement"].items():
        losses = ", ".join(f"{name}: {entry['loss']:.2f} ({100 * entry['read_as_prompt']:.1f}% right)" for name, entry in agreement["models"].items())
        print(f"{when}: ranks generated images as the judge does with AUC {agreement['auc']}; mean loss of the prompt: {losses}")
    print(f"prefers the true caption on {100 * summary['prefers_true_caption']:.1f}% of fresh two-object images")


if __name__ == "__main__":
    main()
