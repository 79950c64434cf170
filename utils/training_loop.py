"""The CoMat training loop, shared by ``train_comat.py`` (SD 1.x/2.x) and ``train_comat_sdxl.py`` (SDXL).

:class:`CoMatIteration` holds the models, modules and optimizers and runs one iteration:
:meth:`~CoMatIteration.micro_step` (online sample → decode → losses → backward, then the discriminator's
forward and backward) and :meth:`~CoMatIteration.update` (one optimizer step of both). :func:`train`
builds it and drives it: accelerator, prompts, resume, loop, checkpoints, final save. The benchmark
``benchmarks/bench_iteration.py`` drives the same object, with a :class:`PhaseTimer` that says where
the time goes.

Everything that depends on the model family comes from a *family* object that each script defines
(see ``StableDiffusionFamily`` in ``train_comat.py``):

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

import contextlib
import functools
import logging
import math
import os
import sys
import time

import torch

from .attention_capture import install_attention_capture
from .attribute_concentration import attribute_concentration_losses
from .checkpointing import (
    claim_output_dir,
    find_resume_checkpoint,
    load_checkpoint,
    remove_unused_output_dir,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .concept_matching import load_caption_scorer
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
    latent_moment_loss,
    lora_disabled,
    reference_noise_seed,
)
from .eval_prompts import category_of, load_eval_prompts
from .evaluation import Generation, summarize
from .grounded_segmentation import load_segmenter
from .hub import prepare_hub_repo, public_training_settings, push_command, push_folder_to_hub, save_model_card
from .model_loading import ModelLoadError
from .prompts import load_prompts
from .scorers import load_scorers, score_category, scorers_for
from .training import (
    GradScalerState,
    NonFiniteGuard,
    ResumableBatchSampler,
    StepAbandoned,
    StopRequest,
    all_reduce_gradients,
    any_process,
    apply_learning_rates,
    broadcast_parameters,
    check_lora_layers,
    check_replicas_in_sync,
    check_resume_settings,
    configure_logging,
    load_unet_lora,
    lora_config,
    lora_metadata,
    make_accelerator,
    parse_lora_layers,
    resume_settings,
    sampling_generator,
    stop_when_launcher_dies,
    total_train_steps,
    trainable_parameters,
    unet_lora_state_dict,
    warn_about_long_prompts,
)

logger = logging.getLogger(__name__)

# The phases of one iteration, in the order they run (``PhaseTimer`` names). The UNet calls of sampling are
# split by whether they run with gradient; "generator_backward" is the one backward pass of the generator loss
# through every module (including the UNet recomputation of gradient checkpointing).
ITERATION_PHASES = (
    "text_encoding",
    "sampling_no_grad",
    "gradient_steps",
    "vae_decode",
    "grounding",
    "captioner",
    "attention_losses",
    "discriminator_g",
    "generator_backward",
    "reference_latents",
    "discriminator_d",
    "optimizer",
)


class PhaseTimer:
    """Wall-clock seconds per named phase of an iteration, for benchmarks; does nothing unless enabled.

    Disabled (the default, and always so in training), :meth:`phase` returns one shared no-op context: no
    clock is read and CUDA is never synchronised. Enabled, CUDA is synchronised when a phase starts and ends,
    so that the kernels a phase launched are charged to it.

    Phases do not nest: a phase entered while another runs is part of the outer one. So the UNet calls that
    gradient checkpointing recomputes in backward count as backward, and the base model's sampling of
    uncached reference latents counts as reference latents.
    """

    def __init__(self, enabled: bool = False, device=None):
        self.enabled = enabled
        self.synchronizes_cuda = device is not None and torch.device(device).type == "cuda"
        self.seconds: dict[str, float] = {}
        self._running = False

    def phase(self, name: str):
        if not self.enabled or self._running:
            return _NO_PHASE
        return self._timed(name)

    def reset(self):
        self.seconds = {}

    @contextlib.contextmanager
    def _timed(self, name):
        self._synchronize()
        self._running = True
        start = time.perf_counter()
        try:
            yield
        finally:
            self._synchronize()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            self._running = False

    def _synchronize(self):
        if self.synchronizes_cuda:
            torch.cuda.synchronize()


_NO_PHASE = contextlib.nullcontext()


class AttributeConcentration:
    """Module 2: entities → token positions, Grounded-SAM masks, losses on the captured attention maps."""

    def __init__(self, args, family, device, vae_scale_factor):
        self.nlp = load_spacy_model(args.spacy_model)
        self.stoplist = load_entity_stoplist(args.entity_stoplist)
        self.attend_all_nouns = args.attend_all_nouns
        self.tokenizer = family.tokenizers[0]
        self.segmenter = load_segmenter(args, device)
        self.store = install_attention_capture(family.unet, args.attention_layers, args.resolution, vae_scale_factor)
        self._entities_by_prompt = {}

    def entities(self, prompts):
        """Per prompt: (segmenter queries, token positions) of its entities (cached: prompts repeat every epoch)."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._entities_by_prompt]
        if missing:
            parsed = extract_entities_batch(missing, self.nlp, self.stoplist, self.attend_all_nouns)
            for prompt, entities in zip(missing, parsed):
                kept = entities_token_positions(prompt, entities, self.tokenizer)
                self._entities_by_prompt[prompt] = ([e.grounding_query for e, _ in kept], [positions for _, positions in kept])
        return [self._entities_by_prompt[p] for p in prompts]

    def masks(self, images, prompts):
        """Per image, the Grounded-SAM mask of each entity of its prompt (no gradient)."""
        return self.segmenter(images.detach(), [queries for queries, _ in self.entities(prompts)])

    def losses(self, step_maps, masks, prompts):
        """(token loss, pixel loss, number of entities, number of them the segmenter did not find) of captured maps
        (``store.step_maps``) against the masks."""
        token_positions = [positions for _, positions in self.entities(prompts)]
        num_entities = sum(len(positions) for positions in token_positions)
        num_undetected = sum(int((~image_masks.flatten(1).any(dim=1)).sum()) for image_masks in masks)
        token_loss, pixel_loss = attribute_concentration_losses(step_maps, masks, token_positions)
        return token_loss, pixel_loss, num_entities, num_undetected


class FidelityPreservation:
    """Module 3: a UNet discriminator on clean latents; "real" = the frozen base model's own samples."""

    def __init__(self, args, family, accelerator):
        if args.discriminator_model_name_or_path in (None, args.pretrained_model_name_or_path):
            # Same checkpoint: D is a second LoRA adapter on the generator's frozen UNet (no second copy).
            self.discriminator = UNetDiscriminator.from_unet(family.unet, args.discriminator_rank)
        else:
            # Another checkpoint: the base model's --revision/--variant are not its own.
            self.discriminator = UNetDiscriminator.from_pretrained(
                args.discriminator_model_name_or_path, args.discriminator_rank, dtype=family.unet.dtype, cache_dir=args.cache_dir,
            ).to(accelerator.device)
        self.discriminator.head.to(accelerator.device)
        self.parameters = self.discriminator.trainable_parameters()
        # D's parameter group of the run's single optimizer (see CoMatIteration: one optimizer, one grad scaler).
        self.param_group = {
            "params": self.parameters, "lr": args.discriminator_learning_rate,
            "betas": (args.discriminator_adam_beta1, args.discriminator_adam_beta2),
            "weight_decay": args.adam_weight_decay, "eps": args.adam_epsilon,
        }
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

    def generator_loss(self, latents, timestep):
        """The generator's adversarial loss on its samples (D frozen: only the generator gets gradient)."""
        return generator_adversarial_loss(self.logits(latents, timestep))

    @contextlib.contextmanager
    def trainable(self):
        """D's LoRA and head take gradient inside the block (its own step) and are frozen again after it."""
        self.discriminator.requires_grad_(True)
        try:
            yield
        finally:
            self.discriminator.requires_grad_(False)

    def discriminator_losses(self, real_latents, fake_latents, timestep):
        """D's loss on the reference ("real") and detached generated ("fake") latents, and its accuracies."""
        real_logits = self.logits(real_latents.to(fake_latents.dtype), timestep)
        fake_logits = self.logits(fake_latents, timestep)
        accuracy_real, accuracy_fake = discriminator_accuracy(real_logits, fake_logits)
        return {
            "discriminator_loss": discriminator_loss(real_logits, fake_logits),
            "discriminator_accuracy_real": accuracy_real,
            "discriminator_accuracy_fake": accuracy_fake,
        }


def _constant_learning_rate(step):
    return 1.0


class CoMatIteration:
    """The models, modules and optimizers of a CoMat run, and one iteration on them.

    Building it loads every model (bad input raises ``ModelLoadError``, ``ValueError`` or ``OSError`` with a
    message naming the flag), adds the generator LoRA and makes both optimizers and the LR schedule. Then
    each optimizer step is ``gradient_accumulation_steps`` calls of :meth:`micro_step` and one of
    :meth:`update`. ``timer`` (a :class:`PhaseTimer`, disabled by default) times the phases of both.

    Args:
        args: the parsed flags of ``train_comat.py`` / ``train_comat_sdxl.py``.
        family: the model family (see the module docstring); its ``load`` is called here.
        accelerator: the run's ``accelerate.Accelerator``.
        max_train_steps: optimizer steps of the run (the LR schedule's length).
        timer: where the phases are timed.
    """

    def __init__(self, args, family, accelerator, max_train_steps, timer=None):
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import cast_training_params

        self.args, self.family, self.accelerator = args, family, accelerator
        self.timer = timer if timer is not None else PhaseTimer()
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

        # ---- Models and modules --------------------------------------------------------------------
        family.load(args, self.weight_dtype)
        lora_layers = parse_lora_layers(args.lora_layers)
        check_lora_layers(family.unet, lora_layers)
        self.caption_scorer = load_caption_scorer(args, self.weight_dtype)
        self.unet, self.vae = family.unet, family.vae
        for model in (self.unet, self.vae, *family.text_encoders):
            model.to(accelerator.device)
        self.caption_scorer.to(accelerator.device)
        vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.unet.add_adapter(lora_config(args.rank, args.lora_alpha, lora_layers))
        self.lora_parameters = trainable_parameters(self.unet)
        self.attribute_concentration = (
            AttributeConcentration(args, family, accelerator.device, vae_scale_factor) if args.attribute_concentration else None
        )
        self.fidelity = FidelityPreservation(args, family, accelerator) if args.fidelity_preservation else None
        if args.gradient_checkpointing:
            # The sampler checkpoints the UNet calls of gradient steps itself (see sample_with_gradient).
            self.vae.enable_gradient_checkpointing()
            if self.fidelity is not None:
                self.fidelity.discriminator.enable_gradient_checkpointing()

        # ---- Generator LoRA (fp32 under mixed precision), identical on every process ----------------
        if self.weight_dtype != torch.float32:
            cast_training_params(self.unet, dtype=torch.float32)  # the generator LoRA (D's adapter is fp32 already)
        broadcast_parameters(self.lora_parameters, accelerator)
        if self.fidelity is not None:
            broadcast_parameters(self.fidelity.parameters, accelerator)

        # ---- Optimizers, LR schedule ----------------------------------------------------------------
        if args.scale_lr:
            args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
        optimizer_class = torch.optim.AdamW
        if args.use_8bit_adam:
            import bitsandbytes as bnb

            optimizer_class = bnb.optim.AdamW8bit
        # One optimizer, two parameter groups (generator LoRA; discriminator LoRA + head): under fp16 a single
        # grad scaler must unscale and step all gradients once per iteration — with two accelerate optimizers it
        # would unscale the second one twice. Updating both groups in one step is the recipe's "D step after the
        # G step": D's gradients come from detached samples, the generator's from a frozen D.
        param_groups = [{"params": self.lora_parameters}]
        if self.fidelity is not None:
            param_groups.append(self.fidelity.param_group)
        optimizer = optimizer_class(
            param_groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
            weight_decay=args.adam_weight_decay, eps=args.adam_epsilon,
        )
        self.lr_scheduler = get_scheduler(
            args.lr_scheduler, optimizer=optimizer, num_warmup_steps=args.lr_warmup_steps, num_training_steps=max_train_steps
        )
        if self.fidelity is not None:
            # --lr_scheduler shapes the generator's learning rate; the discriminator's stays constant (recipe).
            self.lr_scheduler.lr_lambdas[1] = _constant_learning_rate
            optimizer.param_groups[1]["lr"] = args.discriminator_learning_rate  # undo the schedule's step 0
        self.optimizer = accelerator.prepare(optimizer)
        self.nonfinite_guard = NonFiniteGuard(args.max_nonfinite_steps)

        # ---- Sampling ----------------------------------------------------------------------------------
        latent_side = args.resolution // vae_scale_factor
        self.latent_shape = (args.train_batch_size, self.unet.config.in_channels, latent_side, latent_side)
        self.sampling_scheduler = make_sampling_scheduler(args.sampler, family.scheduler_config)
        self.max_crop = args.resolution // 224

    @property
    def trainable_parameters(self):
        """Every parameter the optimizer updates: the generator LoRA, then the discriminator's LoRA and head."""
        return self.lora_parameters + (self.fidelity.parameters if self.fidelity is not None else [])

    @property
    def checkpointed_modules(self):
        """What a checkpoint holds besides the LoRA, the optimizers and the LR schedule."""
        modules = [self.fidelity.discriminator] if self.fidelity is not None else []
        if self.accelerator.scaler is not None:
            modules.append(GradScalerState(self.accelerator.scaler))
        return modules

    def save_lora(self, directory):
        self.family.pipeline_class.save_lora_weights(
            directory, unet_lora_layers=unet_lora_state_dict(self.unet), unet_lora_adapter_metadata=lora_metadata(self.unet)
        )

    def load_lora(self, directory):
        load_unet_lora(self.unet, self.family.pipeline_class, directory)

    def predict_noise(self, latent_model_input, t, unet_kwargs):
        """The UNet call of every sampling step, on the classifier-free-guidance batch ``[uncond; cond]``."""
        with self.timer.phase("gradient_steps" if torch.is_grad_enabled() else "sampling_no_grad"):
            return self.unet(latent_model_input.to(self.unet.dtype), t, **unet_kwargs).sample.float()

    def base_noise(self, latent_model_input, t, unet_kwargs):
        """The frozen base model's UNet call (generator LoRA off), for the KL penalty."""
        with lora_disabled(self.unet):
            return self.predict_noise(latent_model_input, t, unet_kwargs)

    def sample(self, unet_kwargs, latents, num_inference_steps, gradient_steps, attention_steps, generator, with_kl=False):
        """Online sampling from ``latents`` (unit noise) to the clean latents, differentiable at ``gradient_steps``;
        ``with_kl`` also returns the KL penalty to the base model (see ``sample_with_gradient``'s reference gap)."""
        args = self.args
        attention_capture = self.attribute_concentration.store.capturing if self.attribute_concentration is not None else None
        return sample_with_gradient(
            functools.partial(self.predict_noise, unet_kwargs=unet_kwargs), self.sampling_scheduler,
            latents * self.sampling_scheduler.init_noise_sigma, num_inference_steps, gradient_steps, args.guidance_scale,
            args.guidance_rescale, args.detach_unet_input, args.gradient_checkpointing, attention_steps,
            attention_capture, generator,
            reference_denoise=functools.partial(self.base_noise, unet_kwargs=unet_kwargs) if with_kl else None,
            reference_min_timestep=args.kl_loss_min_timestep,
        )

    def sampling_noise(self, generator):
        """The unit noise a training sample starts from."""
        return torch.randn(self.latent_shape, generator=generator).to(self.accelerator.device)

    def reference_latents(self, prompts):
        """The frozen base model's samples (generator LoRA off) for these prompts, cached on disk."""
        return self.fidelity.cache.get_or_create(prompts, self.generate_reference_latents).to(self.accelerator.device)

    @torch.no_grad()
    def generate_reference_latents(self, prompts):
        """Sample the frozen base model for ``prompts`` in one batch. Each prompt draws its noise (initial and
        per step) from its own generator, seeded by the prompt, so its latents do not depend on which batch,
        process or run asks for them first (up to the rounding of batched UNet calls)."""
        generators = [torch.Generator().manual_seed(reference_noise_seed(prompt, self.args.seed)) for prompt in prompts]
        noise = torch.cat([torch.randn((1, *self.latent_shape[1:]), generator=g) for g in generators])
        with lora_disabled(self.unet):
            unet_kwargs = self.family.unet_kwargs(list(prompts))
            return self.sample(unet_kwargs, noise.to(self.accelerator.device), self.args.num_inference_steps, [], [], generators)

    def micro_step(self, batch_prompts, micro_step):
        """Generator, then discriminator: forward and backward on one batch (gradients accumulate).

        The sampling noise, gradient steps and crop are functions of (seed, ``micro_step``, process). Returns
        the losses (tensors, for logging) and whether they are finite; a non-finite loss is not back-propagated.
        """
        args, timer = self.args, self.timer
        generator = sampling_generator(args.seed, micro_step, self.accelerator.process_index)
        gradient_steps = select_gradient_steps(args.num_inference_steps, args.num_grad_steps, generator)
        attention_steps = []
        if self.attribute_concentration is not None:
            attention_steps = select_attention_steps(gradient_steps, args.attention_loss_steps, generator)
            self.attribute_concentration.store.clear()

        # Generator: online sample → decode → losses.
        latents = self.sampling_noise(generator)
        with timer.phase("text_encoding"):
            unet_kwargs = self.family.unet_kwargs(batch_prompts)
        sampled = self.sample(
            unet_kwargs, latents, args.num_inference_steps, gradient_steps, attention_steps, generator, with_kl=args.kl_loss_weight > 0
        )
        clean_latents, kl_loss = sampled if args.kl_loss_weight > 0 else (sampled, None)
        with timer.phase("vae_decode"):
            images = decode_latents(self.vae, clean_latents)
        if self.attribute_concentration is not None:
            # Before the captioner: its activations, kept for backward, are not alive yet while Grounded-SAM runs.
            with timer.phase("grounding"):
                masks = self.attribute_concentration.masks(images, batch_prompts)
        with timer.phase("captioner"):
            caption_loss = self.caption_scorer.loss(images, batch_prompts, args.caption_loss_reduction, generator, self.max_crop)
        if not caption_loss.requires_grad:
            raise RuntimeError(
                f"The caption scorer ({args.caption_scorer or args.caption_model_name_or_path}) returned a loss that is not "
                "connected to the images, so the generator cannot be trained. A --caption_scorer must keep its loss "
                "differentiable in the images even where it has no signal, e.g. by adding 0 * images.sum()."
            )
        losses = {"caption_loss": caption_loss}
        loss = args.caption_loss_weight * caption_loss
        if self.attribute_concentration is not None:
            with timer.phase("attention_losses"):
                token_loss, pixel_loss, num_entities, num_undetected = self.attribute_concentration.losses(
                    self.attribute_concentration.store.step_maps, masks, batch_prompts
                )
            losses.update(token_loss=token_loss, pixel_loss=pixel_loss)
            loss = loss + args.token_loss_weight * token_loss + args.pixel_loss_weight * pixel_loss
            losses["entities_per_prompt"] = torch.tensor(num_entities / len(batch_prompts))
            losses["undetected_entities_per_prompt"] = torch.tensor(num_undetected / len(batch_prompts))
        if kl_loss is not None:
            losses["kl_loss"] = kl_loss
            loss = loss + args.kl_loss_weight * kl_loss
        final_timestep = self.sampling_scheduler.timesteps[-1]
        real_latents = None
        if self.fidelity is not None and args.latent_moment_loss_weight > 0:
            with timer.phase("reference_latents"):
                real_latents = self.reference_latents(batch_prompts)
            losses["latent_moment_loss"] = latent_moment_loss(clean_latents, real_latents)
            loss = loss + args.latent_moment_loss_weight * losses["latent_moment_loss"]
        if self.fidelity is not None:
            with timer.phase("discriminator_g"):
                losses["adversarial_loss_g"] = self.fidelity.generator_loss(clean_latents, final_timestep)
            loss = loss + args.adversarial_loss_weight * losses["adversarial_loss_g"]
        losses["loss"] = loss
        is_finite = bool(torch.isfinite(loss).item())
        if is_finite:
            with timer.phase("generator_backward"):
                self.accelerator.backward(loss)  # accelerate divides by the accumulation steps
        if self.attribute_concentration is not None:
            self.attribute_concentration.store.clear()

        # Discriminator: reference latents of the frozen model ("real") vs. detached samples ("fake").
        if self.fidelity is not None:
            if real_latents is None:
                with timer.phase("reference_latents"):
                    real_latents = self.reference_latents(batch_prompts)
            with timer.phase("discriminator_d"), self.fidelity.trainable():
                losses.update(self.fidelity.discriminator_losses(real_latents, clean_latents.detach(), final_timestep))
                is_finite &= bool(torch.isfinite(losses["discriminator_loss"]).item())
                if is_finite:
                    self.accelerator.backward(losses["discriminator_loss"])
        return losses, is_finite

    def update(self, step_loss_is_finite, global_step, stop_requested=False):
        """One generator step, then one discriminator step, and gradients reset. All processes skip a step together
        when any had a non-finite loss or gradient (under fp16: an overflow, which the grad scaler skips), and all
        discard it when any was asked to stop (``stop_requested``: its step may be incomplete).
        Returns (logs: the gradient norms and, under fp16, the loss scale; whether the run stops)."""
        args, accelerator, scaler = self.args, self.accelerator, self.accelerator.scaler
        logs = {}
        with self.timer.phase("optimizer"):
            any_nonfinite, stopping = any_process([not step_loss_is_finite, stop_requested], accelerator)
            if stopping:
                self.optimizer.zero_grad(set_to_none=True)
                return logs, True
            update_is_finite = not any_nonfinite
            if update_is_finite:
                # Average the *scaled* gradients of both groups, then unscale: every process then sees the same
                # gradients, so the scaler finds the same overflow everywhere and the loss scales stay equal.
                all_reduce_gradients(self.trainable_parameters, accelerator)
                if scaler is not None:
                    scaler.unscale_(self.optimizer.optimizer)
                logs["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.lora_parameters, args.max_grad_norm).item()
                if self.fidelity is not None:
                    logs["discriminator_grad_norm"] = torch.nn.utils.clip_grad_norm_(
                        self.fidelity.parameters, args.discriminator_max_grad_norm
                    ).item()
                # Under fp16 the grad scaler skips overflowing steps itself; otherwise an inf norm is ours to skip.
                update_is_finite = scaler is not None or all(math.isfinite(norm) for norm in logs.values())
            if self.nonfinite_guard.check(update_is_finite, global_step):
                self.optimizer.step()
                if not self.optimizer.step_was_skipped:  # the LR schedule counts the updates that happened
                    self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            logs["loss_scale"] = scaler.get_scale()
        return logs, False


def train(args, family):
    # ---- Accelerator, logging, seed ----------------------------------------------------------------
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    stop_when_launcher_dies()
    accelerator = make_accelerator(args)
    configure_logging(accelerator)
    logger.info(accelerator.state)
    set_seed(args.seed)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True

    # ---- Output folder, prompts, resume point, models (bad input ends here with a message) ---------
    output_dir_is_new = not os.path.exists(args.output_dir)
    try:
        # Held until the process ends: a second run into this folder is refused.
        output_dir_lock = claim_output_dir(
            args.output_dir, resuming=args.resume_from_checkpoint is not None or args.prepare_reference_latents_only,
            overwrite=args.overwrite_output_dir,
        ) if accelerator.is_main_process else None
        repo_id = args.hub_model_id or os.path.basename(os.path.normpath(args.output_dir))
        if args.push_to_hub and accelerator.is_main_process and not args.prepare_reference_latents_only:
            repo_id = prepare_hub_repo(repo_id, private=args.hub_private)
        prompts = load_prompts(args.train_data, args.text_column, args.cache_dir)
        max_train_steps = total_train_steps(args, len(prompts), accelerator.num_processes)
        settings = resume_settings(args, prompts, accelerator.num_processes)
        resume_dir, saved_state = find_resume_checkpoint(args.resume_from_checkpoint, args.output_dir)
        if resume_dir is not None:
            check_resume_settings(saved_state.get("settings", {}), settings, resume_dir)
        comat = CoMatIteration(args, family, accelerator, max_train_steps)
        alignment = (
            AlignmentEvaluation(args, accelerator.device)
            if args.eval_prompts and accelerator.is_main_process and not args.prepare_reference_latents_only else None
        )
        warn_about_long_prompts(prompts, family.tokenizers)
        if args.prepare_reference_latents_only:
            prepare_reference_latents(comat, prompts)
            return

        # ---- Resume, prompt order -------------------------------------------------------------------
        global_step = 0
        if resume_dir is not None:
            learning_rates = list(comat.lr_scheduler.base_lrs)
            global_step = load_checkpoint(
                accelerator, resume_dir, comat.load_lora, [comat.optimizer], [comat.lr_scheduler], comat.checkpointed_modules
            )["global_step"]
            apply_learning_rates(comat.optimizer, comat.lr_scheduler, learning_rates)
            logger.info(f"Resumed from {resume_dir} at step {global_step}")
    except (ModelLoadError, ValueError, OSError) as error:
        logger.error(str(error))
        if accelerator.is_main_process and output_dir_is_new:
            remove_unused_output_dir(args.output_dir)
        raise SystemExit(2) from None

    batch_sampler = ResumableBatchSampler(
        len(prompts), args.train_batch_size, accelerator.num_processes, accelerator.process_index, args.seed,
        start_micro_step=global_step * args.gradient_accumulation_steps,
    )
    dataloader = torch.utils.data.DataLoader(prompts, batch_sampler=batch_sampler, collate_fn=list, num_workers=args.dataloader_num_workers)
    if accelerator.is_main_process:
        accelerator.init_trackers("comat", config=public_training_settings(args))

    saved_step = global_step if resume_dir is not None else None

    def checkpoint(step):
        nonlocal saved_step
        save_checkpoint(
            accelerator, args.output_dir, step, comat.save_lora, [comat.optimizer], [comat.lr_scheduler],
            {"micro_step": step * args.gradient_accumulation_steps, "settings": settings}, comat.checkpointed_modules,
            args.checkpoints_total_limit,
        )
        saved_step = step

    # ---- Training loop -----------------------------------------------------------------------------
    logger.info(
        f"{len(prompts)} prompts, {max_train_steps} optimizer steps, batch {args.train_batch_size} × "
        f"{accelerator.num_processes} processes × {args.gradient_accumulation_steps} accumulation; modules: concept matching"
        + (", attribute concentration" if comat.attribute_concentration else "")
        + (", fidelity preservation" if comat.fidelity else "")
    )
    progress = tqdm(range(max_train_steps), initial=global_step, desc="Steps", disable=not accelerator.is_local_main_process)
    batches = iter(dataloader)
    nonfinite_guard = comat.nonfinite_guard
    with StopRequest() as stop:

        def evaluate_alignment():
            try:
                with stop.abandonable():
                    alignment(args, accelerator, family, comat.weight_dtype, global_step)
            except StepAbandoned:
                logger.warning("Alignment evaluation abandoned.")

        if alignment is not None and global_step == 0:
            evaluate_alignment()  # the base model: where the curve starts
        while global_step < max_train_steps:
            logs = {}
            step_loss_is_finite = True
            # A stop discards the step in progress: the RNG goes back to where it stood, so the checkpoint holds
            # exactly the state after the last completed step.
            rng_at_step_start = rng_state()
            try:
                with stop.abandonable():
                    for accumulation_index in range(args.gradient_accumulation_steps):
                        micro_step = global_step * args.gradient_accumulation_steps + accumulation_index
                        losses, loss_is_finite = comat.micro_step(next(batches), micro_step)
                        step_loss_is_finite &= loss_is_finite
                        for name, value in losses.items():
                            logs[name] = logs.get(name, 0.0) + value.item() / args.gradient_accumulation_steps
            except StepAbandoned:
                logger.warning(f"Step {global_step + 1} abandoned.")
            update_logs, stopping = comat.update(step_loss_is_finite, global_step, stop_requested=stop.requested)
            if stopping:
                set_rng_state(*rng_at_step_start)
                if saved_step != global_step and global_step > 0:
                    checkpoint(global_step)
                break
            logs.update(update_logs)
            global_step += 1
            progress.update(1)
            logs.update(lr=comat.lr_scheduler.get_last_lr()[0], skipped_nonfinite_steps=nonfinite_guard.total_skipped)
            progress.set_postfix(loss=f"{logs.get('loss', float('nan')):.4f}")
            accelerator.log(logs, step=global_step)

            if nonfinite_guard.exhausted:
                checkpoint(global_step)
                accelerator.end_training()
                logger.error(
                    f"{args.max_nonfinite_steps} optimizer steps in a row had a non-finite loss (last: step {global_step}); "
                    f"saved checkpoint-{global_step}. Lower --learning_rate, use --mixed_precision bf16, or check the "
                    "prompts, then resume with --resume_from_checkpoint latest (the new learning rate applies)."
                )
                raise SystemExit(1)
            if global_step % args.checkpointing_steps == 0 or global_step == max_train_steps:
                checkpoint(global_step)
            if alignment is not None and (global_step % args.eval_steps == 0 or global_step == max_train_steps):
                evaluate_alignment()
            if args.validation_prompt and global_step % args.validation_steps == 0 and global_step < max_train_steps:
                if accelerator.is_main_process:
                    try:
                        with stop.abandonable():
                            log_validation(args, accelerator, family, comat.weight_dtype, global_step)
                    except StepAbandoned:
                        logger.warning("Validation abandoned.")
        progress.close()

        if stop.requested and global_step < max_train_steps:
            logger.warning(
                f"Stopped at step {global_step} (checkpoint-{global_step}); resume with --resume_from_checkpoint latest."
                if global_step > 0 else "Stopped before the first step completed: nothing to save."
            )
            accelerator.end_training()
            sys.exit(stop.exit_code)

        # ---- Final LoRA, validation, model card, Hub --------------------------------------------------
        check_replicas_in_sync(comat.lora_parameters, accelerator)
        upload_failed = False
        if accelerator.is_main_process:
            comat.save_lora(args.output_dir)
            image_paths = []
            if args.validation_prompt:
                try:
                    with stop.abandonable():
                        image_paths = log_validation(args, accelerator, family, comat.weight_dtype, global_step)
                except StepAbandoned:
                    logger.warning("Final validation abandoned: the model card has no sample images.")
            save_model_card(
                args.output_dir, args.pretrained_model_name_or_path, family.pipeline_class.__name__, public_training_settings(args),
                args.validation_prompt, image_paths, repo_id=repo_id if args.push_to_hub else None,
            )
            logger.info(f"Saved the CoMat LoRA to {args.output_dir}")
            if args.push_to_hub:
                try:
                    with stop.abandonable():
                        push_folder_to_hub(args.output_dir, repo_id, private=args.hub_private)
                except StepAbandoned:
                    logger.warning(f"Upload interrupted. The LoRA is saved in {args.output_dir}; upload it with: {push_command(args.output_dir, repo_id)}")
                except Exception as error:  # noqa: BLE001 - whatever failed, the LoRA is safe and the retry is the same
                    upload_failed = True
                    logger.error(
                        f"Upload to {repo_id} failed ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
                        f"The LoRA is saved in {args.output_dir}; retry with: {push_command(args.output_dir, repo_id)}"
                    )
        accelerator.wait_for_everyone()
        accelerator.end_training()
    if output_dir_lock is not None:
        output_dir_lock.close()
    if stop.requested:
        sys.exit(stop.exit_code)
    if upload_failed:
        sys.exit(1)


def prepare_reference_latents(comat, prompts):
    """Fill the reference-latent cache for ``prompts``: each process samples its share, in batches."""
    accelerator = comat.accelerator
    share = list(dict.fromkeys(prompts))[accelerator.process_index :: accelerator.num_processes]
    generated = comat.fidelity.cache.prefill(
        share, comat.generate_reference_latents, comat.args.train_batch_size, show_progress=accelerator.is_local_main_process
    )
    accelerator.wait_for_everyone()
    logger.info(f"Reference latents ready in {comat.fidelity.cache.cache_dir} ({generated} generated by process {accelerator.process_index}).")
    accelerator.end_training()


def render_image(pipeline, family, args, prompt, generator):
    """One image of ``prompt`` with the validation pipeline (25 steps, ``--resolution``), as uint8 ``[H, W, 3]``.

    The pipeline stops at the latents and the training decode turns them into pixels: the VAE may run in another
    dtype than the UNet (SDXL's VAE in fp32 under fp16), which the stock pipelines' decode refuses."""
    latents = pipeline(
        prompt, num_inference_steps=25, height=args.resolution, width=args.resolution, generator=generator,
        output_type="latent",
    ).images
    with torch.no_grad():
        pixels = decode_latents(family.vae, latents)[0].permute(1, 2, 0)
    return (pixels * 255).round().to(torch.uint8).cpu().numpy()


class AlignmentEvaluation:
    """``--eval_prompts``: alignment scores of the model being trained, on fixed prompts and seeds (main process).

    The scorers (``utils.scorers``, those the prompt sets' categories need) load once, before training; each call
    renders every prompt set with the current LoRA as the validation does and logs the mean of every metric as
    ``alignment/CATEGORY/METRIC``."""

    def __init__(self, args, device):
        self.prompt_sets = load_eval_prompts(args.eval_prompts, "--eval_prompts", args.eval_num_prompts)
        needed = dict.fromkeys(name for category in self.prompt_sets for name in scorers_for(category_of(category)))
        self.scorers = load_scorers(
            needed, blip_vqa_model=args.blip_vqa_model, grounding_model=args.grounding_model_name_or_path,
            clip_model=args.clip_model, spacy_model=args.spacy_model, device=device, box_threshold=args.box_threshold,
            text_threshold=args.text_threshold, show_progress=False, flags={"detection": "--grounding_model_name_or_path"},
        )
        self.seeds = [args.seed + index for index in range(args.eval_images_per_prompt)]

    def __call__(self, args, accelerator, family, weight_dtype, global_step):
        pipeline = family.validation_pipeline(args, weight_dtype)
        pipeline.set_progress_bar_config(disable=True)
        logs = {}
        for category, prompts in self.prompt_sets.items():
            generation = Generation(
                "current", [prompt for prompt in prompts for _ in self.seeds], [seed for _ in prompts for seed in self.seeds]
            )
            generation.images = [
                render_image(pipeline, family, args, prompt, torch.Generator(device="cpu").manual_seed(seed))
                for prompt, seed in zip(generation.prompts, generation.seeds)
            ]
            score_category({"current": generation}, category_of(category), self.scorers)
            # the means leave out metrics that do not apply to an image (NaN), as the evaluate command's tables do
            for metric, entry in summarize({"current": generation}, baseline="current")["current"].items():
                logs[f"alignment/{category}/{metric}"] = entry["mean"]
        accelerator.log(logs, step=global_step)
        logger.info(f"Alignment at step {global_step}: " + ", ".join(f"{name} {value:.4f}" for name, value in logs.items()))
        return logs


def log_validation(args, accelerator, family, weight_dtype, global_step):
    """Render ``--validation_prompt`` with the current LoRA; log to the trackers, save PNGs, return their paths."""
    import numpy as np
    from PIL import Image

    logger.info(f"Validation at step {global_step}: {args.num_validation_images} images of {args.validation_prompt!r}")
    pipeline = family.validation_pipeline(args, weight_dtype)
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator(device="cpu").manual_seed(args.seed)
    images = [
        Image.fromarray(render_image(pipeline, family, args, args.validation_prompt, generator))
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
