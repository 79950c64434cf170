"""Does the world's model place objects through its cross-attention maps? The premise of Attribute Concentration.

Attribute Concentration trains each entity's cross-attention to fall inside that entity's region; it assumes the
maps already locate objects roughly (as Stable Diffusion's do, the observation Prompt-to-Prompt and the paper build
on). This probe measures that premise: it samples the fine-tune prompts with the stock pipeline (optionally with a
LoRA), captures the conditional cross-attention maps of the layers training uses (``mid,up``) at the last sampling
steps, and reports, per layer group, the share of each found entity's attention (its tokens summed, heads and maps
averaged, normalised over pixels) that falls inside the entity's own mask from the world's exact segmenter — next
to the share a spatially uniform map would put there (the mask's area share) and the share inside the mask
mirrored left to right (the other object's side: orientation check).

    OMP_NUM_THREADS=2 python -m benchmarks.efficacy.attention_localisation --world_dir world --output attention_localisation.json
"""

import argparse
import json
import logging
import os
import time

import numpy as np
import torch

from benchmarks.efficacy import world
from utils.attention_capture import install_attention_capture
from utils.attribute_concentration import resize_masks
from utils.entities import entities_token_positions, extract_entities_batch, load_entity_stoplist, load_spacy_model

logger = logging.getLogger(__name__)
ATTENTION_LAYERS = "mid,up"  # experiment.py's --attention_layers
LAST_STEPS = 5  # the sampling steps whose maps are read (the image's layout is settled by then)


def localisation(world_dir, lora=None, seeds=2, num_inference_steps=20, guidance_scale=7.5):
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(os.path.join(world_dir, "sd"), safety_checker=None)
    pipeline.set_progress_bar_config(disable=True)
    if lora:
        pipeline.load_lora_weights(lora)
    resolution = pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    store = install_attention_capture(pipeline.unet, ATTENTION_LAYERS, resolution, pipeline.vae_scale_factor,
                                      record_without_grad=True)
    entities = extract_entities_batch(world.FINETUNE_PROMPTS, load_spacy_model("en_core_web_sm"), load_entity_stoplist(None))
    segmenter = world.ShapeSegmenter()
    shares = {}  # group → {"mask": [...], "uniform": [...], "mirrored": [...]}
    for seed in range(seeds):
        for prompt, prompt_entities in zip(world.FINETUNE_PROMPTS, entities, strict=True):
            kept = entities_token_positions(prompt, prompt_entities, pipeline.tokenizer)
            store.clear()
            with store.capturing():
                image = pipeline(prompt, generator=torch.Generator().manual_seed(seed), output_type="pt",
                                 num_inference_steps=num_inference_steps, guidance_scale=guidance_scale).images
            masks = segmenter(image, [[entity.grounding_query for entity, _ in kept]])[0]
            for step in store.step_maps[-LAST_STEPS:]:
                for group, group_maps in step.items():
                    side = int(group_maps[0].shape[2] ** 0.5)
                    small_masks = resize_masks(masks, side)
                    mean_map = torch.stack([m[0].float().mean(dim=0) for m in group_maps]).mean(dim=0)  # [pixels, tokens]
                    entry = shares.setdefault(f"{group[0]}:{group[1]}", {"mask": [], "uniform": [], "mirrored": []})
                    for mask, (_, positions) in zip(small_masks, kept, strict=True):
                        if not mask.any():
                            continue  # the object was not drawn
                        attention = mean_map[:, positions].sum(dim=1)
                        attention = attention / attention.sum()
                        entry["mask"].append(float((attention * mask).sum()))
                        entry["uniform"].append(float(mask.mean()))
                        entry["mirrored"].append(float((attention * mask.view(side, side).flip(1).flatten()).sum()))
    return dict(lora=lora, seeds=seeds, prompts=len(world.FINETUNE_PROMPTS), last_steps=LAST_STEPS,
                groups={group: {name: float(np.mean(values)) for name, values in entry.items()} | {"entities": len(entry["mask"])}
                        for group, entry in shares.items()})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world_dir", default="world", help="The world's models (default: world).")
    parser.add_argument("--lora", default=None, help="A LoRA folder (e.g. a fine-tune's output) to load on the base model (default: none).")
    parser.add_argument("--seeds", type=int, default=2, help="Samples per fine-tune prompt (default: 2).")
    parser.add_argument("--output", default="attention_localisation.json", help="Where the shares are written (JSON).")
    args = parser.parse_args(argv)
    if not os.path.isdir(os.path.join(args.world_dir, "sd")):
        parser.error(f"--world_dir {args.world_dir} has no sd/ model: build the world first (python -m benchmarks.efficacy.pretrain --world_dir {args.world_dir}).")
    if args.lora and not os.path.isfile(os.path.join(args.lora, "pytorch_lora_weights.safetensors")):
        parser.error(f"--lora {args.lora} has no pytorch_lora_weights.safetensors: pass a fine-tune's output folder.")
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO)
    start = time.perf_counter()
    result = localisation(args.world_dir, args.lora, args.seeds)
    result["seconds"] = time.perf_counter() - start
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    for group, entry in result["groups"].items():
        print(f"{group}: attention inside the entity's mask {entry['mask']:.3f} (uniform {entry['uniform']:.3f}, "
              f"mirrored mask {entry['mirrored']:.3f}; {entry['entities']} entity maps)")
    print(args.output)


if __name__ == "__main__":
    main()
