#!/usr/bin/env python
"""CoMat for SDXL: LoRA fine-tuning with image-to-text concept matching, attribute concentration and
fidelity preservation.

Same method, loop and flags as ``train_comat.py`` (the loop lives in ``utils/training_loop.py``);
this file holds what SDXL does differently: two tokenizers and text encoders (penultimate hidden
states concatenated, pooled embedding of the second), the ``add_time_ids`` micro-conditioning for
the training resolution, SDXL's negative conditioning (zeros when the checkpoint says
``force_zeros_for_empty_prompt``), an fp32 VAE decode under fp16 (SDXL's VAE overflows in fp16)
unless the fp16-fixed VAE is given, and an SDXL UNet as the discriminator.

Launch (native 1024 px; the defaults are the SDXL recipe: lr 2e-5, batch 6, adversarial weight 0.5)::

    accelerate launch train_comat_sdxl.py \\
      --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \\
      --pretrained_vae_model_name_or_path madebyollin/sdxl-vae-fp16-fix \\
      --output_dir comat-sdxl --mixed_precision fp16 --gradient_checkpointing --push_to_hub

The paper's 512 px variant (with a UNet first fine-tuned at 512 px, which the authors did not release)::

    accelerate launch train_comat_sdxl.py --resolution 512 \\
      --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \\
      --pretrained_unet_model_name_or_path YOUR_512PX_UNET --mixed_precision fp16 --gradient_checkpointing

Then: ``StableDiffusionXLPipeline.from_pretrained(base).load_lora_weights("comat-sdxl")``.
"""

import argparse

import utils  # noqa: F401  (first: it hides expected library warnings before diffusers loads)
import torch
from diffusers import StableDiffusionXLPipeline

from utils.attention_capture import SDXL_DEFAULT_ATTENTION_LAYERS
from utils.model_loading import is_sdxl_checkpoint, load_pretrained, read_model_index
from utils.training import HelpFormatter, add_training_arguments, resolve_resolution, validate_args
from utils.training_loop import train

# Defaults = the SDXL recipe of comat_method.md, at SDXL's native resolution.
SDXL_RECIPE = {
    "output_dir": "comat-sdxl",
    "resolution": 1024,
    "train_batch_size": 6,
    "learning_rate": 2e-5,
    "detach_unet_input": True,
    "attention_layers": SDXL_DEFAULT_ATTENTION_LAYERS,
    "adversarial_loss_weight": 0.5,
    "discriminator_learning_rate": 5e-5,
}


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_training_arguments(parser, SDXL_RECIPE)
    sdxl = parser.add_argument_group("SDXL")
    sdxl.add_argument("--pretrained_vae_model_name_or_path", type=str, default=None, help="Another VAE, e.g. madebyollin/sdxl-vae-fp16-fix (decodes in fp16). Under fp16 a VAE whose config sets force_upcast (SDXL's own) runs in fp32. Loaded without the base model's --revision/--variant.")
    sdxl.add_argument("--pretrained_unet_model_name_or_path", type=str, default=None, help="Another UNet (a diffusers UNet folder or Hub id), e.g. the recipe's UNet fine-tuned at 512 px. Loaded without the base model's --revision/--variant.")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    validate_args(args, parser)
    return args


class StableDiffusionXLFamily:
    """What the shared training loop needs to know about SDXL."""

    pipeline_class = StableDiffusionXLPipeline

    def load(self, args, weight_dtype):
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        model_index = read_model_index(args.pretrained_model_name_or_path, args.revision, args.cache_dir)
        if not is_sdxl_checkpoint(model_index):
            raise ValueError(
                f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path} is not an SDXL checkpoint "
                f"({model_index.get('_class_name')}); train Stable Diffusion 1.x/2.x with train_comat.py."
            )
        self.force_zeros_for_empty_prompt = model_index.get("force_zeros_for_empty_prompt", True)
        flag, base = "--pretrained_model_name_or_path", args.pretrained_model_name_or_path
        common = dict(revision=args.revision, cache_dir=args.cache_dir)
        weights = dict(variant=args.variant, dtype=weight_dtype, **common)
        self.tokenizers = [
            load_pretrained(CLIPTokenizer, base, flag, subfolder="tokenizer", **common),
            load_pretrained(CLIPTokenizer, base, flag, subfolder="tokenizer_2", **common),
        ]
        self.text_encoders = [
            load_pretrained(CLIPTextModel, base, flag, subfolder="text_encoder", **weights),
            load_pretrained(CLIPTextModelWithProjection, base, flag, subfolder="text_encoder_2", **weights),
        ]
        # A separate VAE or UNet is another checkpoint: the base model's --revision/--variant are not its own.
        if args.pretrained_vae_model_name_or_path:
            self.vae = load_pretrained(AutoencoderKL, args.pretrained_vae_model_name_or_path, "--pretrained_vae_model_name_or_path", cache_dir=args.cache_dir)
        else:
            self.vae = load_pretrained(AutoencoderKL, base, flag, subfolder="vae", variant=args.variant, **common)
        # A VAE that overflows in fp16 says so with force_upcast (SDXL's own does; the fp16-fixed one does not):
        # it decodes in fp32 under fp16. bf16 has the range and stays as is.
        upcast_vae = weight_dtype == torch.float16 and self.vae.config.get("force_upcast", True)
        self.vae.to(torch.float32 if upcast_vae else weight_dtype)
        if args.pretrained_unet_model_name_or_path:
            self.unet = load_pretrained(UNet2DConditionModel, args.pretrained_unet_model_name_or_path, "--pretrained_unet_model_name_or_path", dtype=weight_dtype, cache_dir=args.cache_dir)
        else:
            self.unet = load_pretrained(UNet2DConditionModel, base, flag, subfolder="unet", **weights)
        self.scheduler_config = load_pretrained(DDPMScheduler, base, flag, subfolder="scheduler", **common).config
        for model in (*self.text_encoders, self.vae, self.unet):
            model.requires_grad_(False)
        self.resolution = resolve_resolution(args, self.unet, self.vae)
        self._negative = None

    @torch.no_grad()
    def _encode(self, prompts):
        """(prompt embeds [B, 77, 768 + 1280], pooled embeds [B, 1280]) as StableDiffusionXLPipeline builds them."""
        hidden_states = []
        for tokenizer, text_encoder in zip(self.tokenizers, self.text_encoders):
            input_ids = tokenizer(
                list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
            ).input_ids
            output = text_encoder(input_ids.to(text_encoder.device), output_hidden_states=True)
            hidden_states.append(output.hidden_states[-2])
        return torch.cat(hidden_states, dim=-1), output.text_embeds

    def _time_ids(self, batch_size):
        # (original size, crop top-left, target size): an uncropped image at the training resolution.
        time_ids = torch.tensor([[self.resolution, self.resolution, 0, 0, self.resolution, self.resolution]], dtype=self.unet.dtype)
        return time_ids.to(self.unet.device).repeat(batch_size, 1)

    def _negative_embeds(self, batch_size):
        if self._negative is None:
            prompt_embeds, pooled = self._encode([""])
            if self.force_zeros_for_empty_prompt:
                prompt_embeds, pooled = torch.zeros_like(prompt_embeds), torch.zeros_like(pooled)
            self._negative = (prompt_embeds, pooled)
        prompt_embeds, pooled = self._negative
        return prompt_embeds.expand(batch_size, -1, -1), pooled.expand(batch_size, -1)

    def unet_kwargs(self, prompts):
        prompt_embeds, pooled = self._encode(prompts)
        negative_embeds, negative_pooled = self._negative_embeds(len(prompts))
        return {
            "encoder_hidden_states": torch.cat([negative_embeds, prompt_embeds]),
            "added_cond_kwargs": {"text_embeds": torch.cat([negative_pooled, pooled]), "time_ids": self._time_ids(2 * len(prompts))},
        }

    def unconditional_unet_kwargs(self, batch_size):
        negative_embeds, negative_pooled = self._negative_embeds(batch_size)
        return {
            "encoder_hidden_states": negative_embeds,
            "added_cond_kwargs": {"text_embeds": negative_pooled, "time_ids": self._time_ids(batch_size)},
        }

    def validation_pipeline(self, args, weight_dtype):
        return self.pipeline_class.from_pretrained(
            args.pretrained_model_name_or_path, unet=self.unet, vae=self.vae,
            text_encoder=self.text_encoders[0], text_encoder_2=self.text_encoders[1],
            tokenizer=self.tokenizers[0], tokenizer_2=self.tokenizers[1], revision=args.revision,
            variant=args.variant, cache_dir=args.cache_dir, dtype=weight_dtype,
        )


def main(argv=None):
    train(parse_args(argv), StableDiffusionXLFamily())


if __name__ == "__main__":
    main()
