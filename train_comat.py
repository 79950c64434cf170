#!/usr/bin/env python
"""CoMat for Stable Diffusion 1.x / 2.x: LoRA fine-tuning with image-to-text concept matching.

The UNet generates images from prompts with its own (differentiable) sampler; a frozen BLIP
captioner scores how well each image shows its prompt (Concept Matching), and the gradient of that
score trains a LoRA on the UNet attention projections. See README.md and ``comat_method.md``.

Launch (the recipe: SD1.5, 8 GPUs, batch 4 per GPU, 2000 steps)::

    accelerate launch train_comat.py \\
      --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
      --output_dir comat-sd15 --mixed_precision fp16 --gradient_checkpointing

Offline demo on CPU with tiny models the project builds itself::

    python -m utils.tiny_models --output_dir tiny-models
    accelerate launch --cpu train_comat.py --pretrained_model_name_or_path tiny-models/sd \\
      --caption_model_name_or_path tiny-models/blip --resolution 64 --train_batch_size 2 \\
      --num_inference_steps 4 --num_grad_steps 2 --max_train_steps 4 --rank 4 --output_dir comat-demo

Then: ``StableDiffusionPipeline.from_pretrained(base).load_lora_weights("comat-sd15")``.
"""

import argparse
import logging
import math
import os
import sys

import torch

from utils.checkpointing import load_checkpoint, resolve_resume_checkpoint, save_checkpoint
from utils.concept_matching import CaptionScorer
from utils.differentiable_sampling import (
    decode_latents,
    make_sampling_scheduler,
    sample_with_gradient,
    select_gradient_steps,
)
from utils.hub import push_folder_to_hub, public_training_settings, save_model_card
from utils.model_loading import ModelLoadError, is_sdxl_checkpoint, load_pretrained, read_model_index
from utils.prompts import load_prompts
from utils.training import (
    InterruptionHandler,
    NonFiniteGuard,
    NonFiniteLossError,
    ResumableBatchSampler,
    add_training_arguments,
    all_reduce_gradients,
    any_process,
    broadcast_parameters,
    check_replicas_in_sync,
    configure_logging,
    load_unet_lora,
    lora_config,
    lora_metadata,
    make_accelerator,
    sampling_generator,
    total_train_steps,
    trainable_parameters,
    unet_lora_state_dict,
    validate_args,
    warn_about_long_prompts,
)

logger = logging.getLogger("train_comat")

# Defaults = the SD1.5 recipe of comat_method.md.
SD_RECIPE = {
    "output_dir": "comat-sd15",
    "resolution": 512,
    "train_batch_size": 4,
    "learning_rate": 5e-5,
    "detach_unet_input": False,
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_training_arguments(parser, SD_RECIPE)
    args = parser.parse_args(argv)
    validate_args(args, parser)
    return args


def load_models(args, weight_dtype):
    """Tokenizer, text encoder, VAE, UNet (all frozen) and the scheduler config of an SD 1.x/2.x checkpoint."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    model_index = read_model_index(args.pretrained_model_name_or_path, args.revision, args.cache_dir)
    if is_sdxl_checkpoint(model_index):
        raise ValueError(
            f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path} is an SDXL checkpoint "
            f"({model_index.get('_class_name')}); train it with train_comat_sdxl.py."
        )
    flag = "--pretrained_model_name_or_path"
    common = dict(revision=args.revision, cache_dir=args.cache_dir)
    base = args.pretrained_model_name_or_path
    tokenizer = load_pretrained(CLIPTokenizer, base, flag, subfolder="tokenizer", **common)
    text_encoder = load_pretrained(CLIPTextModel, base, flag, subfolder="text_encoder", variant=args.variant, **common)
    vae = load_pretrained(AutoencoderKL, base, flag, subfolder="vae", variant=args.variant, **common)
    unet = load_pretrained(UNet2DConditionModel, base, flag, subfolder="unet", variant=args.variant, **common)
    scheduler_config = load_pretrained(DDPMScheduler, base, flag, subfolder="scheduler", **common).config
    for model in (text_encoder, vae, unet):
        model.requires_grad_(False).to(dtype=weight_dtype)
    return tokenizer, text_encoder, vae, unet, scheduler_config


@torch.no_grad()
def encode_prompts(prompts, tokenizer, text_encoder):
    input_ids = tokenizer(
        list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return text_encoder(input_ids.to(text_encoder.device))[0]


def log_validation(args, accelerator, unet, vae, text_encoder, tokenizer, weight_dtype, global_step):
    """Render ``--validation_prompt`` with the current LoRA; log to the trackers and save PNGs; return their paths."""
    from diffusers import StableDiffusionPipeline

    logger.info(f"Validation at step {global_step}: {args.num_validation_images} images of {args.validation_prompt!r}")
    pipeline = StableDiffusionPipeline.from_pretrained(
        args.pretrained_model_name_or_path,
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        safety_checker=None,
        requires_safety_checker=False,
        revision=args.revision,
        variant=args.variant,
        cache_dir=args.cache_dir,
        torch_dtype=weight_dtype,
    )
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    images = [
        pipeline(args.validation_prompt, num_inference_steps=25, height=args.resolution, width=args.resolution, generator=generator).images[0]
        for _ in range(args.num_validation_images)
    ]
    return save_and_log_images(args, accelerator, images, global_step)


def save_and_log_images(args, accelerator, images, global_step):
    import numpy as np

    folder = os.path.join(args.output_dir, "validation")
    os.makedirs(folder, exist_ok=True)
    paths = []
    for index, image in enumerate(images):
        path = os.path.join(folder, f"step_{global_step:06d}_{index}.png")
        image.save(path)
        paths.append(path)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.stack([np.asarray(img) for img in images]), global_step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(img, caption=args.validation_prompt) for img in images]}, step=global_step)
    return paths


def main(argv=None):
    args = parse_args(argv)

    # ---- Accelerator, logging, seed ----------------------------------------------------------------
    from accelerate.utils import set_seed
    from diffusers import StableDiffusionPipeline
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params

    accelerator = make_accelerator(args)
    configure_logging(accelerator)
    logger.info(accelerator.state)
    set_seed(args.seed)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    # ---- Models, prompts (bad input ends here with a message, not a traceback) ---------------------
    try:
        tokenizer, text_encoder, vae, unet, scheduler_config = load_models(args, weight_dtype)
        caption_scorer = CaptionScorer.from_pretrained(
            args.caption_model_name_or_path, prefix=args.caption_prefix, dtype=weight_dtype, cache_dir=args.cache_dir
        )
        prompts = load_prompts(args.train_data, args.text_column, args.cache_dir)
    except (ModelLoadError, ValueError, OSError) as error:
        logger.error(str(error))
        raise SystemExit(2) from None
    warn_about_long_prompts(prompts, [tokenizer])
    for model in (text_encoder, vae, unet):
        model.to(accelerator.device)
    caption_scorer.to(accelerator.device)
    if args.gradient_checkpointing:
        vae.enable_gradient_checkpointing()

    # ---- Generator LoRA (fp32 under mixed precision), identical on every process --------------------
    unet.add_adapter(lora_config(args.rank, args.lora_alpha))
    if weight_dtype != torch.float32:
        cast_training_params(unet, dtype=torch.float32)
    lora_parameters = trainable_parameters(unet)
    broadcast_parameters(lora_parameters, accelerator)

    # ---- Optimizer, prompt order, LR schedule -------------------------------------------------------
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    optimizer_class = torch.optim.AdamW
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer_class = bnb.optim.AdamW8bit
    optimizer = optimizer_class(
        lora_parameters, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay, eps=args.adam_epsilon,
    )
    max_train_steps = total_train_steps(args, len(prompts), accelerator.num_processes)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps, num_training_steps=max_train_steps)
    optimizer = accelerator.prepare(optimizer)

    def save_lora(directory):
        StableDiffusionPipeline.save_lora_weights(
            directory, unet_lora_layers=unet_lora_state_dict(unet), unet_lora_adapter_metadata=lora_metadata(unet)
        )

    def load_lora(directory):
        load_unet_lora(unet, StableDiffusionPipeline, directory)

    global_step = 0
    resume_dir = resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir)
    if resume_dir is not None:
        state = load_checkpoint(accelerator, resume_dir, load_lora, [optimizer], [lr_scheduler])
        global_step = state["global_step"]
        logger.info(f"Resumed from {resume_dir} at step {global_step}")

    batch_sampler = ResumableBatchSampler(
        len(prompts), args.train_batch_size, accelerator.num_processes, accelerator.process_index, args.seed,
        start_micro_step=global_step * args.gradient_accumulation_steps,
    )
    dataloader = torch.utils.data.DataLoader(
        prompts, batch_sampler=batch_sampler, collate_fn=list, num_workers=args.dataloader_num_workers
    )

    if accelerator.is_main_process:
        accelerator.init_trackers("comat", config=public_training_settings(args))

    # ---- Training loop -----------------------------------------------------------------------------
    negative_embeds = encode_prompts([""], tokenizer, text_encoder)
    vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    latent_shape = (args.train_batch_size, unet.config.in_channels, args.resolution // vae_scale_factor, args.resolution // vae_scale_factor)
    training_scheduler = make_sampling_scheduler(args.sampler, scheduler_config)
    nonfinite_guard = NonFiniteGuard(args.max_nonfinite_steps)
    max_crop = args.resolution // 224

    def checkpoint(step):
        save_checkpoint(
            accelerator, args.output_dir, step, save_lora, [optimizer], [lr_scheduler],
            {"micro_step": step * args.gradient_accumulation_steps}, checkpoints_total_limit=args.checkpoints_total_limit,
        )

    logger.info(f"{len(prompts)} prompts, {max_train_steps} optimizer steps, batch {args.train_batch_size} × {accelerator.num_processes} processes × {args.gradient_accumulation_steps} accumulation")
    from tqdm.auto import tqdm

    progress = tqdm(range(max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process)
    batches = iter(dataloader)
    interrupted = None
    with InterruptionHandler() as interruption:
        while global_step < max_train_steps:
            logs = {"caption_loss": 0.0}
            step_loss_is_finite = True
            for accumulation_index in range(args.gradient_accumulation_steps):
                micro_step = global_step * args.gradient_accumulation_steps + accumulation_index
                batch_prompts = next(batches)
                generator = sampling_generator(args.seed, micro_step, accelerator.process_index)
                gradient_steps = select_gradient_steps(args.num_inference_steps, args.num_grad_steps, generator)

                prompt_embeds = encode_prompts(batch_prompts, tokenizer, text_encoder)
                encoder_hidden_states = torch.cat([negative_embeds.expand_as(prompt_embeds), prompt_embeds])

                def denoise(latent_model_input, t):
                    return unet(latent_model_input.to(weight_dtype), t, encoder_hidden_states=encoder_hidden_states).sample.float()

                latents = torch.randn(latent_shape, generator=generator).to(accelerator.device) * training_scheduler.init_noise_sigma
                clean_latents = sample_with_gradient(
                    denoise, training_scheduler, latents, args.num_inference_steps, gradient_steps,
                    args.guidance_scale, args.guidance_rescale, args.detach_unet_input, args.gradient_checkpointing,
                    generator=generator,
                )
                images = decode_latents(vae, clean_latents)
                caption_loss = caption_scorer.loss(images, batch_prompts, args.caption_loss_reduction, generator, max_crop)
                loss = args.caption_loss_weight * caption_loss
                step_loss_is_finite &= bool(torch.isfinite(loss).item())
                if step_loss_is_finite:
                    accelerator.backward(loss / args.gradient_accumulation_steps)
                logs["caption_loss"] += caption_loss.item() / args.gradient_accumulation_steps

            update_is_finite = not any_process(not step_loss_is_finite, accelerator)
            if update_is_finite:
                all_reduce_gradients(lora_parameters, accelerator)
                logs["grad_norm"] = accelerator.clip_grad_norm_(lora_parameters, args.max_grad_norm).item()
                # Under fp16 the grad scaler skips overflowing steps itself; otherwise an inf norm is ours to skip.
                update_is_finite = accelerator.scaler is not None or math.isfinite(logs["grad_norm"])
            if nonfinite_guard.check(update_is_finite, global_step):
                optimizer.step()
                lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1
            progress.update(1)
            logs.update(lr=lr_scheduler.get_last_lr()[0], skipped_nonfinite_steps=nonfinite_guard.total_skipped)
            progress.set_postfix(caption_loss=f"{logs['caption_loss']:.4f}")
            accelerator.log(logs, step=global_step)

            if nonfinite_guard.exhausted:
                checkpoint(global_step)
                accelerator.wait_for_everyone()
                accelerator.end_training()
                raise NonFiniteLossError(
                    f"{args.max_nonfinite_steps} optimizer steps in a row had a non-finite loss (last: step {global_step}); "
                    f"saved checkpoint-{global_step}. Lower --learning_rate, use --mixed_precision bf16, or check the prompts."
                )
            if any_process(interruption.received is not None, accelerator):
                interrupted = interruption.received or 15
                checkpoint(global_step)
                break
            if global_step % args.checkpointing_steps == 0 and global_step < max_train_steps:
                checkpoint(global_step)
            if args.validation_prompt and global_step % args.validation_steps == 0 and accelerator.is_main_process:
                log_validation(args, accelerator, unet, vae, text_encoder, tokenizer, weight_dtype, global_step)
    progress.close()

    if interrupted is not None:
        logger.warning(f"Stopped by a signal at step {global_step}; resume with --resume_from_checkpoint latest.")
        accelerator.wait_for_everyone()
        accelerator.end_training()
        sys.exit(128 + interrupted)

    # ---- Final LoRA, validation, model card, Hub --------------------------------------------------
    check_replicas_in_sync(lora_parameters, accelerator)
    if accelerator.is_main_process:
        save_lora(args.output_dir)
        image_paths = []
        if args.validation_prompt:
            image_paths = log_validation(args, accelerator, unet, vae, text_encoder, tokenizer, weight_dtype, global_step)
        repo_id = args.hub_model_id or os.path.basename(os.path.normpath(args.output_dir))
        save_model_card(
            args.output_dir, args.pretrained_model_name_or_path, "StableDiffusionPipeline", public_training_settings(args),
            args.validation_prompt, image_paths, repo_id=repo_id if args.push_to_hub else None,
        )
        if args.push_to_hub:
            push_folder_to_hub(args.output_dir, repo_id, token=args.hub_token, private=args.hub_private)
        logger.info(f"Saved the CoMat LoRA to {args.output_dir}")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
