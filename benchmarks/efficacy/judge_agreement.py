"""Does a captioner's loss rank the generator's images as the judge does? Where it does not, CoMat is hacked.

CoMat lowers the caption loss of the generator's samples; that helps only where a lower loss means an image the judge
reads as its prompt. This samples the base model and LoRAs on the same prompts and seeds and reports, per captioner:
per model, the share of images the judge reads as the prompt and the mean caption loss of the prompt (sum over
tokens), and over all images the ROC AUC of the loss against the judge's verdict. A LoRA whose images the captioner
scores better than the base model's while the judge reads fewer right has hacked it; comparing the fine-tune
prompts with the held-out ones says whether the hack is learned per prompt.

    OMP_NUM_THREADS=2 python -m benchmarks.efficacy.judge_agreement --world_dir world --captioners world/blip \
        --loras efficacy-results/RUN/runs/full_CoMat --prompt_set finetune --split balanced --output agreement.json
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


def judge_agreement(scorer, generations):
    """How well ``scorer``'s caption loss ranks generated images as the judge does: per model, the share of its images
    the judge reads as their prompt and the mean loss of the prompt on those and on the others; over all images, the
    probability that a right image has the lower loss than a wrong one (ROC AUC; 0.5: no better than chance)."""
    losses, rights, models = [], [], {}
    for name, generation in generations.items():
        right = [world.judge(image, prompt)["full_prompt"] for image, prompt in zip(generation.images, generation.prompts)]
        with torch.no_grad():
            loss = [scorer.loss(images_to_tensor([image]), [prompt], "sum").item()
                    for image, prompt in zip(generation.images, generation.prompts)]
        models[name] = dict(read_as_prompt=float(np.mean(right)), loss=float(np.mean(loss)),
                            loss_right=float(np.mean([l for l, r in zip(loss, right) if r])) if any(right) else None,
                            loss_wrong=float(np.mean([l for l, r in zip(loss, right) if not r])) if not all(right) else None)
        losses += loss
        rights += right
    right_losses = np.array([l for l, r in zip(losses, rights) if r])
    wrong_losses = np.array([l for l, r in zip(losses, rights) if not r])
    auc = None
    if len(right_losses) and len(wrong_losses):
        pairs = right_losses[:, None] - wrong_losses[None]
        auc = float((pairs < 0).mean() + 0.5 * (pairs == 0).mean())
    return dict(auc=auc, models=models)


def measure(world_dir, captioners, loras, prompt_set="evaluation", split="balanced", seeds=SEEDS, prompts=None):
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
                captioners={captioner: judge_agreement(CaptionScorer.from_pretrained(captioner), generations) for captioner in captioners})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world_dir", default="world", help="The world's models (default: world).")
    parser.add_argument("--captioners", required=True, help="Comma-separated captioner folders to measure, e.g. world/blip.")
    parser.add_argument("--loras", default="", help="Comma-separated LoRA folders (train_comat.py outputs or checkpoints) sampled beside the base model (default: none).")
    parser.add_argument("--prompt_set", choices=["evaluation", "finetune"], default="evaluation", help="The split's held-out evaluation prompts or its fine-tune prompts (default: evaluation).")
    parser.add_argument("--split", choices=list(world.SPLITS), default="balanced", help="As experiment.py's flag (default: balanced).")
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
    result = measure(args.world_dir, captioners, loras, args.prompt_set, args.split)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    for captioner, agreement in result["captioners"].items():
        for name, entry in agreement["models"].items():
            print(f"{captioner} on {name}: read as the prompt {100 * entry['read_as_prompt']:.1f}%, caption loss {entry['loss']:.2f}")
        print(f"{captioner}: AUC {agreement['auc']}")
    print(args.output)


if __name__ == "__main__":
    main()
