"""The CoMat training loop, shared by ``train_comat.py`` (SD 1.x/2.x) and ``train_comat_sdxl.py`` (SDXL).

:func:`train` reads top to bottom in phases: accelerator, models, modules, optimizers, resume,
loop, final save. Everything that depends on the model family comes from a *family* object that
each script defines (see ``StableDiffusionFamily`` in ``train_comat.py``):

* ``pipeline_class`` — the diffusers pipeline class (LoRA saving/loading, validation);
* ``load(args, weight_dtype)`` — loads and freezes the models, sets ``unet``, ``vae``,
  ``text_encoders``, ``tokenizers`` (the first one gives the entity token positions) and
  ``scheduler_config``;
* ``unet_kwargs(prompts)`` — UNet conditioning for the classifier-free-guidance batch ``[uncond; cond]``;
* ``unconditional_unet_kwargs(batch_size)`` — the empty-prompt conditioning (the discriminator's input);
* ``validation_pipeline(args, weight_dtype)`` — a pipeline built around the models being trained.

One iteration (``comat_method.md``): sample online with K gradient steps → decode → caption loss
(+ attribute-concentration losses on the captured cross-attention maps and Grounded-SAM masks)
(+ adversarial loss of a frozen discriminator) → generator step; then the discriminator step on the
frozen model's reference latents vs. the detached samples.
"""

import logging
import math
import os
import sys

import torch

from .attention_capture import install_attention_capture
from .attribute_concentration import attribute_concentration_losses
from .checkpointing import load_checkpoint, resolve_resume_checkpoint, save_checkpoint
from .concept_matching import CaptionScorer
from .differentiable_sampling import (
    decode_latents,
    make_sampling_scheduler,
    sample_with_gradient,
    select_attention_steps,
    select_gradient_steps,
)
from .entities import entities_token_positions, extract_entities_batch, load_entity_stoplist, load_spacy_model
from .fidelity_preservation import (
    ReferenceLatentCache,
    UNetDiscriminator,
    discriminator_accuracy,
    discriminator_loss,
    generator_adversarial_loss,
    lora_disabled,
    reference_noise_seed,
)
from .grounded_segmentation import GroundedSegmenter
from .hub import push_folder_to_hub, public_training_settings, save_model_card
from .model_loading import ModelLoadError
from .prompts import load_prompts
from .training import (
    InterruptionHandler,
    NonFiniteGuard,
    NonFiniteLossError,
    ResumableBatchSampler,
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
    warn_about_long_prompts,
)

logger = logging.getLogger(__name__)


class AttributeConcentration:
    """Module 2: entities → token positions, Grounded-SAM masks, losses on the captured attention maps."""

    def __init__(self, args, family, device, vae_scale_factor):
        self.nlp = load_spacy_model(args.spacy_model)
        self.stoplist = load_entity_stoplist(args.entity_stoplist)
        self.attend_all_nouns = args.attend_all_nouns
        self.tokenizer = family.tokenizers[0]
        self.segmenter = GroundedSegmenter.from_pretrained(
            args.grounding_model_name_or_path, args.sam_model_name_or_path, box_threshold=args.box_threshold,
            text_threshold=args.text_threshold, device=device, cache_dir=args.cache_dir,
        )
        self.store = install_attention_capture(family.unet, args.attention_layers, args.resolution, vae_scale_factor)
        self._entities_by_prompt = {}

    def entities(self, prompts):
        """Per prompt: (nouns, token positions) of its entities (cached: prompts repeat every epoch)."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._entities_by_prompt]
        if missing:
            parsed = extract_entities_batch(missing, self.nlp, self.stoplist, self.attend_all_nouns)
            for prompt, entities in zip(missing, parsed):
                kept = entities_token_positions(prompt, entities, self.tokenizer)
                self._entities_by_prompt[prompt] = ([e.noun for e, _ in kept], [positions for _, positions in kept])
        return [self._entities_by_prompt[p] for p in prompts]

    def losses(self, images, prompts):
        """(token loss, pixel loss, number of entities) of a batch whose maps were captured in ``self.store``."""
        nouns, token_positions = zip(*self.entities(prompts))
        masks = self.segmenter(images.detach(), list(nouns))
        token_loss, pixel_loss = attribute_concentration_losses(self.store.step_maps, masks, list(token_positions))
        return token_loss, pixel_loss, sum(len(n) for n in nouns)


class FidelityPreservation:
    """Module 3: a UNet discriminator on clean latents; "real" = the frozen base model's own samples."""

    def __init__(self, args, family, accelerator):
        if args.discriminator_model_name_or_path in (None, args.pretrained_model_name_or_path):
            # Same checkpoint: D is a second LoRA adapter on the generator's frozen UNet (no second copy).
            self.discriminator = UNetDiscriminator.from_unet(family.unet, args.discriminator_rank)
        else:
            self.discriminator = UNetDiscriminator.from_pretrained(
                args.discriminator_model_name_or_path, args.discriminator_rank, dtype=family.unet.dtype,
                revision=args.revision, variant=args.variant, cache_dir=args.cache_dir,
            ).to(accelerator.device)
        self.discriminator.head.to(accelerator.device)
        self.parameters = self.discriminator.trainable_parameters()
        self.optimizer = torch.optim.AdamW(
            self.parameters, lr=args.discriminator_learning_rate,
            betas=(args.discriminator_adam_beta1, args.discriminator_adam_beta2), weight_decay=args.adam_weight_decay,
        )
        cache_dir = args.reference_latents_dir or os.path.join(args.output_dir, "reference_latents")
        self.cache = ReferenceLatentCache(cache_dir, {
            "base_model": args.pretrained_model_name_or_path, "revision": args.revision, "variant": args.variant,
            "unet": getattr(args, "pretrained_unet_model_name_or_path", None),
            "sampler": args.sampler, "num_inference_steps": args.num_inference_steps,
            "guidance_scale": args.guidance_scale, "guidance_rescale": args.guidance_rescale,
            "resolution": args.resolution, "seed": args.seed, "dtype": str(family.unet.dtype),
        })
        self.family = family

    def logits(self, latents, timestep):
        kwargs = self.family.unconditional_unet_kwargs(latents.shape[0])
        return self.discriminator(latents, timestep, kwargs["encoder_hidden_states"], kwargs.get("added_cond_kwargs"))


def train(args, family):
    # ---- Accelerator, logging, seed ----------------------------------------------------------------
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from tqdm.auto import tqdm

    accelerator = make_accelerator(args)
    configure_logging(accelerator)
    logger.info(accelerator.state)
    set_seed(args.seed)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    # ---- Models, prompts, modules (bad input ends here with a message, not a traceback) ------------
    try:
        family.load(args, weight_dtype)
        caption_scorer = CaptionScorer.from_pretrained(
            args.caption_model_name_or_path, prefix=args.caption_prefix, dtype=weight_dtype, cache_dir=args.cache_dir
        )
        prompts = load_prompts(args.train_data, args.text_column, args.cache_dir)
        unet, vae = family.unet, family.vae
        for model in (unet, vae, *family.text_encoders):
            model.to(accelerator.device)
        caption_scorer.to(accelerator.device)
        vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        unet.add_adapter(lora_config(args.rank, args.lora_alpha))
        lora_parameters = trainable_parameters(unet)
        attribute_concentration = (
            AttributeConcentration(args, family, accelerator.device, vae_scale_factor) if args.attribute_concentration else None
        )
        fidelity = FidelityPreservation(args, family, accelerator) if args.fidelity_preservation else None
    except (ModelLoadError, ValueError, OSError) as error:
        logger.error(str(error))
        raise SystemExit(2) from None
    warn_about_long_prompts(prompts, family.tokenizers)
    if args.gradient_checkpointing:
        vae.enable_gradient_checkpointing()

    # ---- Generator LoRA (fp32 under mixed precision), identical on every process --------------------
    if weight_dtype != torch.float32:
        cast_training_params(unet, dtype=torch.float32)  # the generator LoRA (D's adapter is fp32 already)
    broadcast_parameters(lora_parameters, accelerator)
    if fidelity is not None:
        broadcast_parameters(fidelity.parameters, accelerator)

    # ---- Optimizers, LR schedule, prompt order ------------------------------------------------------
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
    optimizers = [accelerator.prepare(optimizer)]
    if fidelity is not None:
        fidelity.optimizer = accelerator.prepare(fidelity.optimizer)
        optimizers.append(fidelity.optimizer)
    extra_states = [fidelity.discriminator] if fidelity is not None else []

    def save_lora(directory):
        family.pipeline_class.save_lora_weights(
            directory, unet_lora_layers=unet_lora_state_dict(unet), unet_lora_adapter_metadata=lora_metadata(unet)
        )

    def load_lora(directory):
        load_unet_lora(unet, family.pipeline_class, directory)

    global_step = 0
    resume_dir = resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir)
    if resume_dir is not None:
        state = load_checkpoint(accelerator, resume_dir, load_lora, optimizers, [lr_scheduler], extra_states)
        global_step = state["global_step"]
        logger.info(f"Resumed from {resume_dir} at step {global_step}")

    batch_sampler = ResumableBatchSampler(
        len(prompts), args.train_batch_size, accelerator.num_processes, accelerator.process_index, args.seed,
        start_micro_step=global_step * args.gradient_accumulation_steps,
    )
    dataloader = torch.utils.data.DataLoader(prompts, batch_sampler=batch_sampler, collate_fn=list, num_workers=args.dataloader_num_workers)
    if accelerator.is_main_process:
        accelerator.init_trackers("comat", config=public_training_settings(args))

    # ---- Training loop -----------------------------------------------------------------------------
    latent_side = args.resolution // vae_scale_factor
    latent_shape = (args.train_batch_size, unet.config.in_channels, latent_side, latent_side)
    sampling_scheduler = make_sampling_scheduler(args.sampler, family.scheduler_config)
    nonfinite_guard = NonFiniteGuard(args.max_nonfinite_steps)
    max_crop = args.resolution // 224
    attention_capture = attribute_concentration.store.capturing if attribute_concentration is not None else None

    def sample(unet_kwargs, latents, gradient_steps, attention_steps, generator):
        def denoise(latent_model_input, t):
            return unet(latent_model_input.to(unet.dtype), t, **unet_kwargs).sample.float()

        return sample_with_gradient(
            denoise, sampling_scheduler, latents * sampling_scheduler.init_noise_sigma, args.num_inference_steps,
            gradient_steps, args.guidance_scale, args.guidance_rescale, args.detach_unet_input,
            args.gradient_checkpointing, attention_steps, attention_capture, generator,
        )

    def reference_latents(batch_prompts):
        """The frozen base model's samples (generator LoRA off) for these prompts, cached on disk.

        Each prompt has its own noise seed and is sampled alone, so its reference latents do not depend on
        which batch, process or run asks for them first."""
        def generate(missing_prompts):
            latents = []
            with torch.no_grad(), lora_disabled(unet):
                for prompt in missing_prompts:
                    generator = torch.Generator().manual_seed(reference_noise_seed(prompt, args.seed))
                    noise = torch.randn((1, *latent_shape[1:]), generator=generator).to(accelerator.device)
                    latents.append(sample(family.unet_kwargs([prompt]), noise, [], [], generator))
            return torch.cat(latents)

        return fidelity.cache.get_or_create(batch_prompts, generate).to(accelerator.device)

    def checkpoint(step):
        save_checkpoint(
            accelerator, args.output_dir, step, save_lora, optimizers, [lr_scheduler],
            {"micro_step": step * args.gradient_accumulation_steps}, extra_states, args.checkpoints_total_limit,
        )

    logger.info(
        f"{len(prompts)} prompts, {max_train_steps} optimizer steps, batch {args.train_batch_size} × "
        f"{accelerator.num_processes} processes × {args.gradient_accumulation_steps} accumulation; modules: concept matching"
        + (", attribute concentration" if attribute_concentration else "") + (", fidelity preservation" if fidelity else "")
    )
    progress = tqdm(range(max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process)
    batches = iter(dataloader)
    interrupted = None
    with InterruptionHandler() as interruption:
        while global_step < max_train_steps:
            logs = {}
            step_loss_is_finite = True
            for accumulation_index in range(args.gradient_accumulation_steps):
                micro_step = global_step * args.gradient_accumulation_steps + accumulation_index
                batch_prompts = next(batches)
                generator = sampling_generator(args.seed, micro_step, accelerator.process_index)
                gradient_steps = select_gradient_steps(args.num_inference_steps, args.num_grad_steps, generator)
                attention_steps = []
                if attribute_concentration is not None:
                    attention_steps = select_attention_steps(gradient_steps, args.attention_loss_steps, generator)
                    attribute_concentration.store.clear()

                # Generator: online sample → decode → losses.
                latents = torch.randn(latent_shape, generator=generator).to(accelerator.device)
                clean_latents = sample(family.unet_kwargs(batch_prompts), latents, gradient_steps, attention_steps, generator)
                images = decode_latents(vae, clean_latents)
                losses = {"caption_loss": caption_scorer.loss(images, batch_prompts, args.caption_loss_reduction, generator, max_crop)}
                loss = args.caption_loss_weight * losses["caption_loss"]
                if attribute_concentration is not None:
                    losses["token_loss"], losses["pixel_loss"], num_entities = attribute_concentration.losses(images, batch_prompts)
                    loss = loss + args.token_loss_weight * losses["token_loss"] + args.pixel_loss_weight * losses["pixel_loss"]
                    losses["entities_per_prompt"] = torch.tensor(num_entities / len(batch_prompts))
                if fidelity is not None:
                    final_timestep = sampling_scheduler.timesteps[-1]
                    losses["adversarial_loss_g"] = generator_adversarial_loss(fidelity.logits(clean_latents, final_timestep))
                    loss = loss + args.adversarial_loss_weight * losses["adversarial_loss_g"]
                losses["loss"] = loss
                step_loss_is_finite &= bool(torch.isfinite(loss).item())
                if step_loss_is_finite:
                    accelerator.backward(loss / args.gradient_accumulation_steps)
                if attribute_concentration is not None:
                    attribute_concentration.store.clear()

                # Discriminator: reference latents of the frozen model ("real") vs. detached samples ("fake").
                if fidelity is not None:
                    real_latents = reference_latents(batch_prompts)
                    fidelity.discriminator.requires_grad_(True)
                    real_logits = fidelity.logits(real_latents.to(clean_latents.dtype), final_timestep)
                    fake_logits = fidelity.logits(clean_latents.detach(), final_timestep)
                    losses["discriminator_loss"] = discriminator_loss(real_logits, fake_logits)
                    losses["discriminator_accuracy_real"], losses["discriminator_accuracy_fake"] = discriminator_accuracy(real_logits, fake_logits)
                    step_loss_is_finite &= bool(torch.isfinite(losses["discriminator_loss"]).item())
                    if step_loss_is_finite:
                        accelerator.backward(losses["discriminator_loss"] / args.gradient_accumulation_steps)
                    fidelity.discriminator.requires_grad_(False)
                for name, value in losses.items():
                    logs[name] = logs.get(name, 0.0) + value.item() / args.gradient_accumulation_steps

            # One generator step, then one discriminator step (all processes skip together).
            update_is_finite = not any_process(not step_loss_is_finite, accelerator)
            if update_is_finite:
                all_reduce_gradients(lora_parameters, accelerator)
                logs["grad_norm"] = accelerator.clip_grad_norm_(lora_parameters, args.max_grad_norm).item()
                if fidelity is not None:
                    all_reduce_gradients(fidelity.parameters, accelerator)
                    logs["discriminator_grad_norm"] = accelerator.clip_grad_norm_(fidelity.parameters, args.discriminator_max_grad_norm).item()
                # Under fp16 the grad scaler skips overflowing steps itself; otherwise an inf norm is ours to skip.
                update_is_finite = accelerator.scaler is not None or all(
                    math.isfinite(logs[k]) for k in ("grad_norm", "discriminator_grad_norm") if k in logs
                )
            if nonfinite_guard.check(update_is_finite, global_step):
                for opt in optimizers:
                    opt.step()
                lr_scheduler.step()
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            global_step += 1
            progress.update(1)
            logs.update(lr=lr_scheduler.get_last_lr()[0], skipped_nonfinite_steps=nonfinite_guard.total_skipped)
            progress.set_postfix(loss=f"{logs.get('loss', float('nan')):.4f}")
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
                log_validation(args, accelerator, family, weight_dtype, global_step)
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
        image_paths = log_validation(args, accelerator, family, weight_dtype, global_step) if args.validation_prompt else []
        repo_id = args.hub_model_id or os.path.basename(os.path.normpath(args.output_dir))
        save_model_card(
            args.output_dir, args.pretrained_model_name_or_path, family.pipeline_class.__name__, public_training_settings(args),
            args.validation_prompt, image_paths, repo_id=repo_id if args.push_to_hub else None,
        )
        if args.push_to_hub:
            push_folder_to_hub(args.output_dir, repo_id, token=args.hub_token, private=args.hub_private)
        logger.info(f"Saved the CoMat LoRA to {args.output_dir}")
    accelerator.wait_for_everyone()
    accelerator.end_training()


def log_validation(args, accelerator, family, weight_dtype, global_step):
    """Render ``--validation_prompt`` with the current LoRA; log to the trackers, save PNGs, return their paths."""
    import numpy as np

    logger.info(f"Validation at step {global_step}: {args.num_validation_images} images of {args.validation_prompt!r}")
    pipeline = family.validation_pipeline(args, weight_dtype)
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    images = [
        pipeline(args.validation_prompt, num_inference_steps=25, height=args.resolution, width=args.resolution, generator=generator).images[0]
        for _ in range(args.num_validation_images)
    ]
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
