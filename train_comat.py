#!/usr/bin/env python
"""CoMat for Stable Diffusion 1.x / 2.x: LoRA fine-tuning with image-to-text concept matching.

The UNet generates images from prompts with its own (differentiable) sampler and is trained on them
with three modules: a frozen BLIP captioner scores how well each image shows its prompt (Concept
Matching); each entity's noun and attribute tokens are pulled onto its Grounded-SAM region in the
cross-attention maps (Attribute Concentration); a UNet discriminator keeps samples close to the
original model's (Fidelity Preservation). The LoRA sits on the UNet attention projections. The loop
is shared with SDXL (``utils/training_loop.py``); this file holds what is specific to SD 1.x/2.x.

Launch (the recipe: SD1.5, 8 GPUs, batch 4 per GPU, 2000 steps)::

    accelerate launch train_comat.py \\
      --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
      --output_dir comat-sd15 --mixed_precision fp16 --gradient_checkpointing

Offline demo on CPU with tiny models the project builds itself::

    bash scripts/offline_demo.sh

Then: ``StableDiffusionPipeline.from_pretrained(base).load_lora_weights("comat-sd15")``.
"""

import argparse

import utils  # noqa: F401  (first: it hides expected library warnings before diffusers loads)
import torch
from diffusers import StableDiffusionPipeline

from utils.attention_capture import SD_DEFAULT_ATTENTION_LAYERS
from utils.model_loading import is_sdxl_checkpoint, load_pretrained, read_model_index
from utils.training import HelpFormatter, add_training_arguments, resolve_resolution, validate_args
from utils.training_loop import train

# Defaults = the SD1.5 recipe of comat_method.md.
SD_RECIPE = {
    "output_dir": "comat-sd15",
    "resolution": 512,
    "train_batch_size": 4,
    "learning_rate": 5e-5,
    "detach_unet_input": False,
    "attention_layers": SD_DEFAULT_ATTENTION_LAYERS,
    "adversarial_loss_weight": 1.0,
    "discriminator_learning_rate": 2e-5,
}


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    return add_training_arguments(parser, SD_RECIPE)


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    validate_args(args, parser)
    return args


class StableDiffusionFamily:
    """What the shared training loop needs to know about SD 1.x/2.x: one CLIP text encoder, no added conditioning."""

    pipeline_class = StableDiffusionPipeline

    def load(self, args, weight_dtype):
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        model_index = read_model_index(args.pretrained_model_name_or_path, args.revision, args.cache_dir)
        if is_sdxl_checkpoint(model_index):
            raise ValueError(
                f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path} is an SDXL checkpoint "
                f"({model_index.get('_class_name')}); train it with train_comat_sdxl.py."
            )
        flag, base = "--pretrained_model_name_or_path", args.pretrained_model_name_or_path
        common = dict(revision=args.revision, cache_dir=args.cache_dir)
        self.tokenizer = load_pretrained(CLIPTokenizer, base, flag, subfolder="tokenizer", **common)
        weights = dict(variant=args.variant, dtype=weight_dtype, **common)
        self.text_encoder = load_pretrained(CLIPTextModel, base, flag, subfolder="text_encoder", **weights)
        self.vae = load_pretrained(AutoencoderKL, base, flag, subfolder="vae", **weights)
        self.unet = load_pretrained(UNet2DConditionModel, base, flag, subfolder="unet", **weights)
        self.scheduler_config = load_pretrained(DDPMScheduler, base, flag, subfolder="scheduler", **common).config
        for model in (self.text_encoder, self.vae, self.unet):
            model.requires_grad_(False)
        resolve_resolution(args, self.unet, self.vae)
        self.tokenizers, self.text_encoders = [self.tokenizer], [self.text_encoder]
        self._negative_embeds = None

    @torch.no_grad()
    def _encode(self, prompts):
        input_ids = self.tokenizer(
            list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        return self.text_encoder(input_ids.to(self.text_encoder.device))[0]

    def _negative(self, batch_size):
        if self._negative_embeds is None:
            self._negative_embeds = self._encode([""])
        return self._negative_embeds.expand(batch_size, -1, -1)

    def unet_kwargs(self, prompts):
        prompt_embeds = self._encode(prompts)
        return {"encoder_hidden_states": torch.cat([self._negative(len(prompts)), prompt_embeds])}

    def unconditional_unet_kwargs(self, batch_size):
        return {"encoder_hidden_states": self._negative(batch_size)}

    def validation_pipeline(self, args, weight_dtype):
        return self.pipeline_class.from_pretrained(
            args.pretrained_model_name_or_path, unet=self.unet, vae=self.vae, text_encoder=self.text_encoder,
            tokenizer=self.tokenizer, safety_checker=None, requires_safety_checker=False, revision=args.revision,
            variant=args.variant, cache_dir=args.cache_dir, dtype=weight_dtype,
        )


def main(argv=None):
    train(parse_args(argv), StableDiffusionFamily())


if __name__ == "__main__":
    main()
