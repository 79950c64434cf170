"""Does a captioner's loss rank the generator's images as the judge does? Where it does not, CoMat is hacked.

CoMat lowers the caption loss of the generator's samples; that helps only where a lower loss means an image the judge
reads as its prompt. This samples the base model and LoRAs on the same prompts and seeds and reports, per captioner:
per model, the share of images the judge reads as the prompt and the mean caption loss of the prompt (sum over
tokens), and over all images the ROC AUC of the loss against the judge's verdict. A LoRA whose images the captioner
scores better than the base model's while the judge reads fewer right has hacked it; comparing the fine-tune
prompts with the held-out ones says whether the hack is learned per prompt. ``--contrastive`` also measures a
contrastive caption score, the prompt's loss against those of its attribute swap and of each of its objects alone
(``contrastive_loss``): whether a score that an image drawing only part of its prompt cannot satisfy ranks better.

    OMP_NUM_THREADS=2 python -m benchmarks.efficacy.judge_agreement --world_dir world --captioners world/blip \
        --loras efficacy-results/RUN/runs/full_CoMat --prompt_set finetune --split balanced --output agreement.json [--contrastive]
"""

import argparse
import json
import logging
import os

import numpy as np
import torch

from benchmarks.efficacy import world
from benchmarks.efficacy.pretrain import images_to_tensor
from utils import evaluation
from utils.concept_matching import CaptionScorer

logger = logging.getLogger(__name__)
SEEDS = (100, 101, 102, 103)  # not the evaluation's seeds (0–7), nor the hardening's (1000+, 2000+)


def negative_captions(prompt):
    """What a part of the prompt would be captioned: each of its objects alone, and its attribute swap where that differs."""
    objects = world.objects_of(prompt)
    negatives = [world.prompt_of([obj]) for obj in objects]
    if len(objects) == 2 and world.swapped_prompt(prompt) != prompt:
        negatives.append(world.swapped_prompt(prompt))
    return negatives


def contrastive_loss(scorer, image, prompt, prompt_loss):
    """−log of the prompt's share of the caption probability among the prompt (its loss ``prompt_loss``, already
    computed) and its :func:`negative_captions`: 0 where the image shows the prompt, log(1 + n) where it fits the n
    negatives as well."""
    losses = torch.tensor([prompt_loss] + [scorer.loss(image, [caption], "sum").item() for caption in negative_captions(prompt)])
    return (losses[0] + torch.logsumexp(-losses, dim=0)).item()


def _auc(losses, rights):
    """The probability that an image the judge reads right has the lower loss than one it reads wrong."""
    right_losses = np.array([l for l, r in zip(losses, rights) if r])
    wrong_losses = np.array([l for l, r in zip(losses, rights) if not r])
    if not len(right_losses) or not len(wrong_losses):
        return None
    pairs = right_losses[:, None] - wrong_losses[None]
    return float((pairs < 0).mean() + 0.5 * (pairs == 0).mean())


def judge_agreement(scorer, generations, contrastive=False):
    """How well ``scorer``'s caption loss ranks generated images as the judge does: per model, the share of its images
    the judge reads as their prompt and the mean loss of the prompt on those and on the others; over all images, the
    probability that a right image has the lower loss than a wrong one (ROC AUC; 0.5: no better than chance).
    ``contrastive``: also the mean :func:`contrastive_loss` per model and its AUC (``contrastive_auc``)."""
    losses, contrastive_losses, rights, models = [], [], [], {}
    for name, generation in generations.items():
        right = [world.judge(image, prompt)["full_prompt"] for image, prompt in zip(generation.images, generation.prompts)]
        loss, contrasted = [], []
        with torch.no_grad():
            for image, prompt in zip(generation.images, generation.prompts):
                pixels = images_to_tensor([image])
                loss.append(scorer.loss(pixels, [prompt], "sum").item())
                if contrastive:
                    contrasted.append(contrastive_loss(scorer, pixels, prompt, loss[-1]))
        models[name] = dict(read_as_prompt=float(np.mean(right)), loss=float(np.mean(loss)),
                            loss_right=float(np.mean([l for l, r in zip(loss, right) if r])) if any(right) else None,
                            loss_wrong=float(np.mean([l for l, r in zip(loss, right) if not r])) if not all(right) else None)
        if contrastive:
            models[name]["contrastive_loss"] = float(np.mean(contrasted))
        losses += loss
        contrastive_losses += contrasted
        rights += right
    result = dict(auc=_auc(losses, rights), models=models)
    if contrastive:
        result["contrastive_auc"] = _auc(contrastive_losses, rights)
    return result


def measure(world_dir, captioners, loras, prompt_set="evaluation", split="balanced", seeds=SEEDS, prompts=None, contrastive=False):
    """:func:`judge_agreement` of each captioner on the base model's and each LoRA's samples of ``prompts`` (default:
    the split's ``prompt_set``)."""
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(os.path.join(world_dir, "sd"), safety_checker=None)
    pipeline.set_progress_bar_config(disable=True)
    if prompts is None:
        finetune_prompts, evaluation_prompts = world.SPLITS[split]
        prompts = evaluation_prompts if prompt_set == "evaluation" else finetune_prompts
    generations = evaluation.generate(pipeline, {"base": None, **{lora: lora for lora in loras}}, prompts, list(seeds),
                                      show_progress=False, num_inference_steps=20, guidance_scale=7.5)
    return dict(prompt_set=prompt_set, split=split, seeds=list(seeds), prompts=len(prompts),
                captioners={captioner: judge_agreement(CaptionScorer.from_pretrained(captioner), generations, contrastive)
                            for captioner in captioners})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world_dir", default="world", help="The world's models (default: world).")
    parser.add_argument("--captioners", required=True, help="Comma-separated captioner folders to measure, e.g. world/blip.")
    parser.add_argument("--loras", default="", help="Comma-separated LoRA folders (train_comat.py outputs or checkpoints) sampled beside the base model (default: none).")
    parser.add_argument("--prompt_set", choices=["evaluation", "finetune"], default="evaluation", help="The split's held-out evaluation prompts or its fine-tune prompts (default: evaluation).")
    parser.add_argument("--split", choices=list(world.SPLITS), default="balanced", help="As experiment.py's flag (default: balanced).")
    parser.add_argument("--contrastive", action="store_true", help="Also measure the contrastive caption score (the prompt against its swap and its objects alone; default: off).")
    parser.add_argument("--output", default="judge_agreement.json", help="Where the results are written (JSON).")
    args = parser.parse_args(argv)
    captioners = [c.strip() for c in args.captioners.split(",") if c.strip()]
    loras = [lora.strip() for lora in args.loras.split(",") if lora.strip()]
    for folder in captioners:
        if not os.path.isdir(folder):
            parser.error(f"--captioners: no captioner folder {folder}.")
    for lora in loras:
        if not os.path.isfile(os.path.join(lora, "pytorch_lora_weights.safetensors")):
            parser.error(f"--loras: no pytorch_lora_weights.safetensors in {lora}; pass a train_comat.py output folder or one of its checkpoint-N folders.")
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO)
    result = measure(args.world_dir, captioners, loras, args.prompt_set, args.split, contrastive=args.contrastive)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    for captioner, agreement in result["captioners"].items():
        for name, entry in agreement["models"].items():
            contrasted = f", contrastive {entry['contrastive_loss']:.2f}" if "contrastive_loss" in entry else ""
            print(f"{captioner} on {name}: read as the prompt {100 * entry['read_as_prompt']:.1f}%, caption loss {entry['loss']:.2f}{contrasted}")
        print(f"{captioner}: AUC {agreement['auc']}" + (f", contrastive AUC {agreement['contrastive_auc']}" if args.contrastive else ""))
    print(args.output)


if __name__ == "__main__":
    main()
