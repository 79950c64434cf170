"""Cost of a CoMat iteration: seconds, peak memory, where the time goes, and how it scales with T and K.

Runs real CoMat iterations — :class:`utils.training_loop.CoMatIteration`, the object ``train()`` drives, with
all three modules — on models built from their published architectures with random weights (no download):

* ``--arch sd15``: the Stable Diffusion 1.5 UNet, VAE and CLIP ViT-L/14 text encoder;
* ``--arch sdxl``: the SDXL base UNet, VAE and both text encoders (CLIP ViT-L/14, OpenCLIP ViT-bigG/14);
* both with BLIP-large (captioner), GroundingDINO-tiny and SAM-base (ViT-B);
* ``--arch tiny``: the tiny models of the test suite (``utils/tiny_models.py``).

The models are written once to ``--model_dir`` and loaded through the training scripts' own loading code.
Each configuration runs in a fresh subprocess, so that on CPU the peak resident set size is that
configuration's; it is the high-water mark of the timed iterations (reset through ``/proc/self/clear_refs``
once the models are loaded). RSS also counts what glibc keeps after frees, so identical runs differ by a few
percent. On CUDA it is ``torch.cuda.max_memory_allocated`` over the timed iterations.

Reported per configuration:

* seconds per iteration (one micro-step and one optimizer update, as ``train()`` runs them) and peak memory;
* the time of each phase inside the iteration (``utils.training_loop.ITERATION_PHASES``, measured by the
  loop's own ``PhaseTimer``), and the same phases timed in isolation in the same run: each phase's code alone
  on the iteration's inputs, forward then backward (each backward is charged to ``generator_backward``, as
  the one backward of the iteration is);
* the overhead ratio: iteration time / the sum of the isolated phases (1.0 = the loop adds nothing).

``--scaling`` sweeps the inference steps T (K fixed) and the gradient steps K (T fixed) and reports time and
peak memory of each (no isolated phases). Peak memory must be flat in T: sampling keeps no graph before the
first gradient step and gradient checkpointing keeps only the UNet inputs of gradient steps.

``--reference_style`` also measures our iteration with the authors' costly choices, side by side:
diffusers' explicit ``AttnProcessor`` on every attention layer at every step, separate conditional and
unconditional UNet calls at the attention-loss steps (the unconditional call's maps computed and dropped),
the discriminator on a second UNet copy (``--discriminator_model_name_or_path`` pointing to a copy of the
base model, i.e. ``UNetDiscriminator.from_pretrained``) and Grounded-SAM image by image.

On CPU, denormal floats are flushed to zero (``torch.set_flush_denormal``; ``--keep_denormals`` keeps them).
With random weights the captioner's backward is full of them (gradients around 1e-7 in BLIP-large's
attention; 1.6% of them subnormal), and each one costs the CPU a microcode assist: BLIP-large's backward
then takes 20 times its normal time, which says nothing about CoMat. GPUs have no such penalty.

A random GroundingDINO scores every query alike: its logits are dot products of unnormalised 256-d features
and saturate the sigmoid, so no threshold picks a realistic number of boxes (it keeps none or all 900, and
which one changes from image to image). A forward hook stands in for a trained detector: per image, the
``--boxes_per_image`` queries with the highest logits keep them, every other query's logits become -inf, and
the segmenter's thresholds are 0. Everything after the detector's forward (box-to-noun assignment, SAM on
every box, masks) runs unchanged, on that fixed number of boxes.

Commands (the README's Performance section; a 2-core CPU, one thread)::

    OMP_NUM_THREADS=1 python benchmarks/bench_iteration.py --arch tiny --num_inference_steps 8 \\
      --num_grad_steps 2 --batch_size 2 --iterations 5 --reference_style --output bench_tiny.json
    OMP_NUM_THREADS=1 python benchmarks/bench_iteration.py --arch tiny --num_inference_steps 16 \\
      --num_grad_steps 2 --batch_size 2 --iterations 3 --scaling --scaling_inference_steps 4 8 16 32 \\
      --scaling_grad_steps 1 2 4 8 --output bench_tiny_scaling.json
    OMP_NUM_THREADS=1 python benchmarks/bench_iteration.py --arch sd15 --resolution 128 \\
      --num_inference_steps 4 --num_grad_steps 2 --batch_size 1 --iterations 3 --output bench_sd15_128.json
    OMP_NUM_THREADS=1 python benchmarks/bench_iteration.py --arch sd15 --resolution 128 \\
      --num_inference_steps 4 --num_grad_steps 2 --batch_size 1 --iterations 2 --reference_style \\
      --no_isolated_phases --output bench_sd15_reference.json
    OMP_NUM_THREADS=1 python benchmarks/bench_iteration.py --arch sd15 --resolution 128 --num_grad_steps 1 \\
      --batch_size 1 --iterations 1 --scaling T --scaling_inference_steps 2 4 8 --output bench_sd15_T.json
    OMP_NUM_THREADS=1 python benchmarks/bench_iteration.py --arch sd15 --resolution 128 \\
      --num_inference_steps 4 --batch_size 1 --iterations 1 --scaling K --scaling_grad_steps 1 2 4 \\
      --output bench_sd15_K.json

On a GPU (the recipe's settings)::

    python benchmarks/bench_iteration.py --arch sd15 --device cuda --resolution 512 --num_inference_steps 50 \\
      --num_grad_steps 5 --batch_size 4 --mixed_precision fp16 --reference_style --output bench_sd15_cuda.json
"""

import argparse
import contextlib
import datetime
import importlib
import json
import logging
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from bench_attention_capture import SD15_UNET_CONFIG  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor  # noqa: E402

from utils.attention_capture import CrossAttentionCaptureProcessor  # noqa: E402
from utils.differentiable_sampling import decode_latents  # noqa: E402
from utils.training import sampling_generator  # noqa: E402
from utils.training_loop import ITERATION_PHASES, CoMatIteration, PhaseTimer  # noqa: E402

logger = logging.getLogger("bench_iteration")

PROMPTS = (
    "a red book and a yellow vase",
    "a blue car and a green bench",
    "a wooden chair and a white cat",
    "a black dog and a brown horse",
)
ARCHES = ("tiny", "sd15", "sdxl")
COMPLETE_MARKER = "models_complete.json"

# ---- Published architectures ------------------------------------------------------------------------------

SD_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
SDXL_VAE_CONFIG = dict(SD_VAE_CONFIG, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
SDXL_UNET_CONFIG = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    cross_attention_dim=2048,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # pooled bigG embedding (1280) + 6 time ids x 256
    norm_num_groups=32,
)
# CLIP ViT-L/14's text tower (SD 1.x, SDXL's first encoder) and OpenCLIP ViT-bigG/14's (SDXL's second).
CLIP_L_TEXT_CONFIG = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu",
    projection_dim=768, max_position_embeddings=77,
)
CLIP_BIGG_TEXT_CONFIG = dict(
    hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, hidden_act="gelu",
    projection_dim=1280, max_position_embeddings=77,
)
# Salesforce/blip-image-captioning-large: ViT-L/16 at 384 px, BERT-base decoder cross-attending to it.
BLIP_LARGE_VISION_CONFIG = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, image_size=384,
    patch_size=16, layer_norm_eps=1e-5,
)
BLIP_LARGE_TEXT_CONFIG = dict(
    hidden_size=768, encoder_hidden_size=1024, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=512, layer_norm_eps=1e-12,
)
# transformers' GroundingDinoConfig() is IDEA-Research/grounding-dino-tiny (Swin-T, BERT-base, 900 queries)
# and SamConfig() is facebook/sam-vit-base; their image processors' defaults are those checkpoints' too.


def _clip_text_config(tokenizer, **config):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=1, **config,
    )


def save_sd15(path, seed):
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    from utils.tiny_models import clip_tokenizer, sd_scheduler

    torch.manual_seed(seed)
    tokenizer = clip_tokenizer()
    StableDiffusionPipeline(
        unet=UNet2DConditionModel(**SD15_UNET_CONFIG),
        vae=AutoencoderKL(**SD_VAE_CONFIG),
        text_encoder=CLIPTextModel(_clip_text_config(tokenizer, **CLIP_L_TEXT_CONFIG)),
        tokenizer=tokenizer,
        scheduler=sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    ).save_pretrained(path)


def save_sdxl(path, seed):
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from utils.tiny_models import clip_tokenizer

    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = clip_tokenizer(), clip_tokenizer(pad_token="!")
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000, steps_offset=1,
        timestep_spacing="leading", prediction_type="epsilon",
    )
    StableDiffusionXLPipeline(
        unet=UNet2DConditionModel(**SDXL_UNET_CONFIG),
        vae=AutoencoderKL(**SDXL_VAE_CONFIG),
        text_encoder=CLIPTextModel(_clip_text_config(tokenizer, **CLIP_L_TEXT_CONFIG)),
        text_encoder_2=CLIPTextModelWithProjection(_clip_text_config(tokenizer_2, **CLIP_BIGG_TEXT_CONFIG)),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler=scheduler,
    ).save_pretrained(path)


def save_blip_large(path, seed):
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    from utils.tiny_models import blip_tokenizer

    tokenizer = blip_tokenizer()
    text_config = dict(
        BLIP_LARGE_TEXT_CONFIG, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id, sep_token_id=tokenizer.sep_token_id,
    )
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(BlipConfig(vision_config=BLIP_LARGE_VISION_CONFIG, text_config=text_config))
    model.save_pretrained(path)
    image_processor = BlipImageProcessor(
        size={"height": 384, "width": 384},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)


def save_grounding_dino_tiny(path, seed):
    from transformers import (
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
    )

    from utils.tiny_models import bert_vocab_file

    torch.manual_seed(seed)
    GroundingDinoForObjectDetection(GroundingDinoConfig()).save_pretrained(path)
    tokenizer = BertTokenizer(vocab=bert_vocab_file(), do_lower_case=True)
    GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(), tokenizer=tokenizer).save_pretrained(path)


def save_sam_base(path, seed):
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

    torch.manual_seed(seed)
    SamModel(SamConfig()).save_pretrained(path)
    SamProcessor(image_processor=SamImageProcessor()).save_pretrained(path)


def prepare_models(arch, model_dir, seed):
    """Writes the models of ``arch`` under ``model_dir/arch`` (once; reused while complete); returns their paths.

    ``discriminator`` is a second path to the base model, so that the reference style's discriminator is
    loaded as a second UNet (``UNetDiscriminator.from_pretrained``) as the authors' code does.
    """
    from utils import tiny_models

    root = os.path.join(model_dir, arch)
    paths = {
        role: os.path.join(root, role) for role in ("base", "blip", "grounding_dino", "sam", "discriminator")
    }
    marker = os.path.join(root, COMPLETE_MARKER)
    if os.path.isfile(marker):
        with open(marker) as f:
            if json.load(f) == {"arch": arch, "seed": seed}:
                return paths
    logger.info(f"Writing the {arch} models with random weights to {root}")
    writers = {
        "tiny": {
            "base": tiny_models.save_tiny_sd,
            "blip": tiny_models.save_tiny_blip,
            "grounding_dino": tiny_models.save_tiny_grounding_dino,
            "sam": tiny_models.save_tiny_sam,
        },
        "sd15": {"base": save_sd15, "blip": save_blip_large, "grounding_dino": save_grounding_dino_tiny, "sam": save_sam_base},
        "sdxl": {"base": save_sdxl, "blip": save_blip_large, "grounding_dino": save_grounding_dino_tiny, "sam": save_sam_base},
    }[arch]
    for role, write in writers.items():
        write(paths[role], seed)
    if not os.path.islink(paths["discriminator"]):
        os.symlink("base", paths["discriminator"])
    with open(marker, "w") as f:
        json.dump({"arch": arch, "seed": seed}, f)
    return paths


# ---- Reference style -----------------------------------------------------------------------------------


class ReferenceStyleIteration(CoMatIteration):
    """Our iteration, but the attention-loss steps call the UNet twice (conditional, then unconditional) as the
    authors' code does; the other reference-style choices are made by :func:`apply_reference_style`."""

    split_timesteps = frozenset()

    def sample(self, unet_kwargs, latents, num_inference_steps, gradient_steps, attention_steps, generator, with_kl=False):
        self.sampling_scheduler.set_timesteps(num_inference_steps)
        self.split_timesteps = {int(self.sampling_scheduler.timesteps[i]) for i in attention_steps}
        return super().sample(unet_kwargs, latents, num_inference_steps, gradient_steps, attention_steps, generator, with_kl)

    def predict_noise(self, latent_model_input, t, unet_kwargs):
        # Decided by the timestep, not by capture, so that the recomputation of gradient checkpointing
        # (which runs outside capture) makes the same two calls as the forward did.
        if not (torch.is_grad_enabled() and int(t) in self.split_timesteps):
            return super().predict_noise(latent_model_input, t, unet_kwargs)
        store = self.attribute_concentration.store
        uncond_input, cond_input = latent_model_input.chunk(2)
        uncond_kwargs, cond_kwargs = _split_cfg_batch(unet_kwargs)
        store.cond_half = "all"
        try:
            noise_pred_cond = super().predict_noise(cond_input, t, cond_kwargs)
            with _maps_discarded(store):
                noise_pred_uncond = super().predict_noise(uncond_input, t, uncond_kwargs)
        finally:
            store.cond_half = "second"
        return torch.cat([noise_pred_uncond, noise_pred_cond])


def _split_cfg_batch(unet_kwargs):
    """The ``[uncond; cond]`` UNet conditioning as (uncond, cond) conditionings."""
    if isinstance(unet_kwargs, dict):
        halves = {key: _split_cfg_batch(value) for key, value in unet_kwargs.items()}
        return {key: pair[0] for key, pair in halves.items()}, {key: pair[1] for key, pair in halves.items()}
    return unet_kwargs.chunk(2)


@contextlib.contextmanager
def _maps_discarded(store):
    # The authors' store records the unconditional call's maps as well, then resets: computed, then dropped.
    store.record = lambda layer, attention_probs: None
    try:
        yield
    finally:
        del store.record


class PerImageSegmenter:
    """Grounded-SAM image by image, as the authors' code runs it (ours runs each model once per batch)."""

    def __init__(self, segmenter):
        self.segmenter = segmenter

    def __call__(self, images, nouns):
        return [self.segmenter(images[index : index + 1], [image_nouns])[0] for index, image_nouns in enumerate(nouns)]


def apply_reference_style(comat):
    """Explicit attention (diffusers' ``AttnProcessor``) on every layer but the captured ones, per-image grounding."""
    processors = {
        name: processor if isinstance(processor, CrossAttentionCaptureProcessor) else AttnProcessor()
        for name, processor in comat.unet.attn_processors.items()
    }
    comat.unet.set_attn_processor(processors)
    if comat.attribute_concentration is not None:
        comat.attribute_concentration.segmenter = PerImageSegmenter(comat.attribute_concentration.segmenter)


# ---- One configuration (runs in its own process) -------------------------------------------------------


def keep_top_detections(segmenter, boxes_per_image):
    """Makes the random detector return ``boxes_per_image`` boxes per image (see the module docstring)."""

    def keep_top_queries(module, inputs, outputs):
        best_logits = outputs.logits.amax(dim=-1)
        top_queries = best_logits.topk(min(boxes_per_image, best_logits.shape[-1]), dim=-1).indices
        kept = torch.zeros_like(best_logits, dtype=torch.bool).scatter_(-1, top_queries, True)
        outputs.logits = outputs.logits.masked_fill(~kept.unsqueeze(-1), float("-inf"))
        return outputs

    segmenter.box_threshold = segmenter.text_threshold = 0.0
    segmenter.grounding_model.register_forward_hook(keep_top_queries)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device):
    """Starts a new peak; False where the CPU peak cannot be reset (then it includes loading the models)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the resident-set high-water mark that ru_maxrss reports
        return True
    except OSError:
        return False


def peak_memory_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux


def current_memory_mib(device):
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**10
    return None


def timed_iteration(comat, prompts, micro_step):
    """One iteration as ``train()`` runs it (gradient accumulation 1): micro-step, update, losses read for logging.

    Returns wall seconds, process CPU seconds and the seconds of each phase inside it."""
    device = comat.accelerator.device
    comat.timer.reset()
    synchronize(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    losses, loss_is_finite = comat.micro_step(prompts, micro_step)
    comat.update(loss_is_finite, micro_step)
    logs = {name: value.item() for name, value in losses.items()}
    synchronize(device)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    if not loss_is_finite or not all(math.isfinite(value) for value in logs.values()):
        raise RuntimeError(f"The iteration's losses are not finite: {logs}")
    return seconds, cpu_seconds, dict(comat.timer.seconds)


def isolated_phases(comat, prompts, micro_step):
    """Each phase of the iteration on its own, with the iteration's code, forward then backward.

    The gradient steps are K steps of a K-step sampler, all with gradient and capture at the first r; every
    backward is charged to ``generator_backward`` (and to the phase it belongs to in the returned
    ``backward_by_phase``). Returns (seconds per phase, backward seconds per phase)."""
    args, timer = comat.args, comat.timer
    timer.reset()
    backward_by_phase = {}

    def backward(phase, outputs, cotangents=None):
        before = timer.seconds.get("generator_backward", 0.0)
        with timer.phase("generator_backward"):
            torch.autograd.backward(outputs, cotangents)
        backward_by_phase[phase] = timer.seconds["generator_backward"] - before

    generator = sampling_generator(args.seed, micro_step, comat.accelerator.process_index)
    noise = comat.sampling_noise(generator)
    num_grad_steps = args.num_grad_steps
    with timer.phase("text_encoding"):
        unet_kwargs = comat.family.unet_kwargs(prompts)
    # The UNet calls time themselves (predict_noise), as inside the iteration: the sampler's own arithmetic is
    # part of the iteration's overhead, not of a phase.
    if args.num_inference_steps > num_grad_steps:
        comat.sample(unet_kwargs, noise, args.num_inference_steps - num_grad_steps, [], [], generator)

    store = comat.attribute_concentration.store if comat.attribute_concentration is not None else None
    attention_steps = list(range(args.attention_loss_steps)) if store is not None else []
    if store is not None:
        store.clear()
    clean_latents = comat.sample(unet_kwargs, noise, num_grad_steps, list(range(num_grad_steps)), attention_steps, generator)
    captured_maps = list(store.step_maps) if store is not None else []
    maps = [m for step in captured_maps for group_maps in step.values() for m in group_maps]
    backward("gradient_steps", [clean_latents, *maps], [torch.randn_like(clean_latents), *map(torch.randn_like, maps)])
    if store is not None:
        store.clear()

    latents = clean_latents.detach().requires_grad_()
    with timer.phase("vae_decode"):
        images = decode_latents(comat.vae, latents)
    backward("vae_decode", [images], [torch.randn_like(images)])

    images = images.detach().requires_grad_()
    if comat.attribute_concentration is not None:
        with timer.phase("grounding"):
            masks = comat.attribute_concentration.masks(images, prompts)
    with timer.phase("captioner"):
        caption_loss = comat.caption_scorer.loss(images, prompts, args.caption_loss_reduction, generator, comat.max_crop)
    backward("captioner", [caption_loss])

    if comat.attribute_concentration is not None:
        step_maps = [
            {group: [m.detach().requires_grad_() for m in group_maps] for group, group_maps in step.items()}
            for step in captured_maps
        ]
        with timer.phase("attention_losses"):
            token_loss, pixel_loss, _, _ = comat.attribute_concentration.losses(step_maps, masks, prompts)
        backward("attention_losses", [token_loss, pixel_loss])

    if comat.fidelity is not None:
        final_timestep = comat.sampling_scheduler.timesteps[-1]
        latents = clean_latents.detach().requires_grad_()
        with timer.phase("discriminator_g"):
            adversarial_loss = comat.fidelity.generator_loss(latents, final_timestep)
        backward("discriminator_g", [adversarial_loss])
        with timer.phase("reference_latents"):
            real_latents = comat.reference_latents(prompts)
        with timer.phase("discriminator_d"), comat.fidelity.trainable():
            losses = comat.fidelity.discriminator_losses(real_latents, clean_latents.detach(), final_timestep)
            losses["discriminator_loss"].backward()

    comat.update(True, micro_step)
    return dict(timer.seconds), backward_by_phase


def run_configuration(config):
    """Builds the iteration for ``config`` (a dict of this script's settings) and measures it; returns the row."""
    import diffusers
    import transformers
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    if config["threads"] is not None:
        torch.set_num_threads(config["threads"])
    if config["device"] == "cpu" and not config["keep_denormals"]:
        torch.set_flush_denormal(True)
    for library in (diffusers, transformers):
        library.utils.logging.set_verbosity_error()
        library.utils.logging.disable_progress_bar()

    paths, work_dir = config["paths"], config["work_dir"]
    training_script = importlib.import_module("train_comat_sdxl" if config["arch"] == "sdxl" else "train_comat")
    flags = {
        "pretrained_model_name_or_path": paths["base"],
        "caption_model_name_or_path": paths["blip"],
        "grounding_model_name_or_path": paths["grounding_dino"],
        "sam_model_name_or_path": paths["sam"],
        "output_dir": os.path.join(work_dir, "output"),
        "reference_latents_dir": os.path.join(work_dir, "reference_latents"),
        "report_to": "none",
        "resolution": config["resolution"],
        "train_batch_size": config["batch_size"],
        "num_inference_steps": config["num_inference_steps"],
        "num_grad_steps": config["num_grad_steps"],
        "attention_loss_steps": config["attention_loss_steps"],
        "max_train_steps": config["warmup"] + 2 * config["iterations"],
        "seed": config["seed"],
        "mixed_precision": config["mixed_precision"],
    }
    if config["arch"] == "tiny":
        # The tiny UNet has two resolution levels, not SD's four; ranks to match its 16/32-wide layers.
        flags.update(attention_layers="mid,up", rank=4, discriminator_rank=4)
    if config["reference_style"]:
        flags["discriminator_model_name_or_path"] = paths["discriminator"]
    argv = [item for key, value in flags.items() for item in (f"--{key}", str(value))]
    argv += ["--gradient_checkpointing"] if config["gradient_checkpointing"] else []
    argv += [f"--{module}" if config[module] else f"--no_{module}" for module in ("attribute_concentration", "fidelity_preservation")]
    args = training_script.parse_args(argv)

    accelerator = Accelerator(mixed_precision=config["mixed_precision"], cpu=config["device"] == "cpu")
    device = accelerator.device
    set_seed(args.seed)
    iteration_class = ReferenceStyleIteration if config["reference_style"] else CoMatIteration
    family = training_script.StableDiffusionXLFamily() if config["arch"] == "sdxl" else training_script.StableDiffusionFamily()
    timer = PhaseTimer(enabled=True, device=device)
    comat = iteration_class(args, family, accelerator, args.max_train_steps, timer=timer)
    prompts = [PROMPTS[index % len(PROMPTS)] for index in range(config["batch_size"])]

    # The base model's reference latents are cached before timing, as they are after a run's first epoch.
    if comat.fidelity is not None:
        comat.reference_latents(prompts)
    if comat.attribute_concentration is not None:
        keep_top_detections(comat.attribute_concentration.segmenter, config["boxes_per_image"])
    if config["reference_style"]:
        apply_reference_style(comat)
    setup_memory = current_memory_mib(device)

    micro_step = 0
    for _ in range(config["warmup"]):
        timed_iteration(comat, prompts, micro_step)
        micro_step += 1
    iterations, peaks, peak_is_iteration_only = [], [], True
    isolated, isolated_backward = [], []
    for index in range(config["iterations"]):
        peak_is_iteration_only &= reset_peak_memory(device)
        iterations.append(timed_iteration(comat, prompts, micro_step))
        peaks.append(peak_memory_mib(device))
        micro_step += 1
        logger.info(f"{config['name']}: iteration {index + 1}/{config['iterations']}: {iterations[-1][0]:.2f} s")
        if config["isolated_phases"]:
            phases, backward_by_phase = isolated_phases(comat, prompts, micro_step)
            isolated.append(phases)
            isolated_backward.append(backward_by_phase)

    seconds = [wall for wall, _, _ in iterations]
    row = {key: config[key] for key in CONFIG_KEYS}
    row.update(
        iteration_seconds=seconds,
        iteration_cpu_seconds=[cpu for _, cpu, _ in iterations],
        seconds_per_iteration=statistics.median(seconds),
        phases_in_iteration=_median_by_key([phases for _, _, phases in iterations]),
        untimed_in_iteration=statistics.median(wall - sum(phases.values()) for wall, _, phases in iterations),
        peak_memory_mib=max(peaks),
        peak_memory_kind="CUDA max allocated" if device.type == "cuda" else "peak RSS",
        peak_memory_scope="timed iterations" if peak_is_iteration_only else "whole process (models included)",
        memory_after_setup_mib=setup_memory,
        threads=torch.get_num_threads(),
    )
    if isolated:
        isolated_totals = [sum(phases.values()) for phases in isolated]
        # Each iteration against the isolated phases timed right after it: on a shared machine, the two
        # halves of a pair see the same load.
        ratios = [iteration / total for iteration, total in zip(seconds, isolated_totals)]
        row.update(
            phases_isolated=_median_by_key(isolated),
            isolated_backward_by_phase=_median_by_key(isolated_backward),
            isolated_total_seconds=statistics.median(isolated_totals),
            overhead_ratios=ratios,
            overhead_ratio=statistics.median(ratios),
        )
    return row


def _median_by_key(dicts):
    keys = dict.fromkeys(key for d in dicts for key in d)
    return {key: statistics.median(d.get(key, 0.0) for d in dicts) for key in keys}


# ---- Orchestration ---------------------------------------------------------------------------------------

CONFIG_KEYS = (
    "name", "arch", "device", "resolution", "batch_size", "num_inference_steps", "num_grad_steps",
    "attention_loss_steps", "mixed_precision", "gradient_checkpointing", "attribute_concentration",
    "fidelity_preservation", "reference_style", "iterations", "warmup", "boxes_per_image", "keep_denormals",
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", choices=ARCHES, default="tiny", help="Model architectures (random weights).")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--resolution", type=int, default=None, help="Image size in px (default: 64 tiny, 512 sd15, 1024 sdxl).")
    parser.add_argument("--num_inference_steps", type=int, default=50, help="Sampling steps T (recipe: 50).")
    parser.add_argument("--num_grad_steps", type=int, default=5, help="Gradient steps K (recipe: 5).")
    parser.add_argument("--attention_loss_steps", type=int, default=2, help="Attention-loss steps r (recipe: 2).")
    parser.add_argument("--batch_size", type=int, default=1, help="Prompts per iteration.")
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    parser.add_argument("--no_gradient_checkpointing", dest="gradient_checkpointing", action="store_false", help="Turn gradient checkpointing off (on by default, as in the recipe).")
    parser.add_argument("--no_attribute_concentration", dest="attribute_concentration", action="store_false", help="Turn module 2 off.")
    parser.add_argument("--no_fidelity_preservation", dest="fidelity_preservation", action="store_false", help="Turn module 3 off.")
    parser.add_argument("--reference_style", action="store_true", help="Also measure the reference-style iteration, side by side.")
    parser.add_argument("--scaling", nargs="*", choices=["T", "K"], default=None, help="Sweep T and K instead (time and peak memory only); `--scaling T` or `--scaling K` runs one sweep.")
    parser.add_argument("--scaling_inference_steps", type=int, nargs="+", default=[4, 8, 16], help="T values of the T sweep (K = --num_grad_steps).")
    parser.add_argument("--scaling_grad_steps", type=int, nargs="+", default=[1, 2, 4], help="K values of the K sweep (T = --num_inference_steps).")
    parser.add_argument("--no_isolated_phases", dest="isolated_phases", action="store_false", help="Do not time the phases in isolation (no overhead ratio; half the time).")
    parser.add_argument("--iterations", type=int, default=3, help="Timed iterations per configuration.")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed iterations first.")
    parser.add_argument("--boxes_per_image", type=int, default=2, help="Boxes the random detector finds per image, one per noun of the benchmark's prompts (see the module docstring).")
    parser.add_argument("--keep_denormals", action="store_true", help="Do not flush denormal floats to zero on CPU (see the module docstring).")
    parser.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: torch's).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model_dir", default=os.path.join(tempfile.gettempdir(), "comat-bench-models"), help="Where the random models are written (and reused).")
    parser.add_argument("--output", default=None, help="Write the results as JSON to this path.")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.resolution is None:
        args.resolution = {"tiny": 64, "sd15": 512, "sdxl": 1024}[args.arch]
    if args.scaling == []:
        args.scaling = ["T", "K"]
    if args.scaling and args.reference_style:
        parser.error("--scaling and --reference_style are separate runs: give one of them.")
    if not args.scaling and args.attribute_concentration and args.attention_loss_steps > args.num_grad_steps:
        parser.error(f"--attention_loss_steps {args.attention_loss_steps} must be at most --num_grad_steps {args.num_grad_steps}.")
    if args.scaling and "T" in args.scaling and min(args.scaling_inference_steps) < args.num_grad_steps:
        parser.error("--scaling_inference_steps must all be at least --num_grad_steps.")
    if args.scaling and "K" in args.scaling and max(args.scaling_grad_steps) > args.num_inference_steps:
        parser.error("--scaling_grad_steps must all be at most --num_inference_steps.")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available.")
    return args


def configurations(args, paths, work_dir):
    base = dict(
        arch=args.arch, device=args.device, resolution=args.resolution, batch_size=args.batch_size,
        num_inference_steps=args.num_inference_steps, num_grad_steps=args.num_grad_steps,
        attention_loss_steps=args.attention_loss_steps if args.attribute_concentration else 0,
        mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
        attribute_concentration=args.attribute_concentration, fidelity_preservation=args.fidelity_preservation,
        reference_style=False, iterations=args.iterations, warmup=args.warmup, boxes_per_image=args.boxes_per_image,
        threads=args.threads, keep_denormals=args.keep_denormals, seed=args.seed, paths=paths,
        isolated_phases=args.isolated_phases,
    )
    if not args.scaling:
        configs = [dict(base, name="ours")]
        if args.reference_style:
            configs.append(dict(base, name="reference_style", reference_style=True))
    else:
        # r stays the same across the sweeps, so that T or K alone changes.
        grad_step_counts = [args.num_grad_steps] if "T" in args.scaling else []
        grad_step_counts += args.scaling_grad_steps if "K" in args.scaling else []
        attention_loss_steps = min(base["attention_loss_steps"], *grad_step_counts)
        base.update(isolated_phases=False, attention_loss_steps=attention_loss_steps)
        configs = []
        if "T" in args.scaling:
            configs += [
                dict(base, name=f"T={steps},K={args.num_grad_steps}", sweep="T", num_inference_steps=steps)
                for steps in args.scaling_inference_steps
            ]
        if "K" in args.scaling:
            configs += [
                dict(base, name=f"T={args.num_inference_steps},K={grad_steps}", sweep="K", num_grad_steps=grad_steps)
                for grad_steps in args.scaling_grad_steps
            ]
    for index, config in enumerate(configs):
        config["work_dir"] = os.path.join(work_dir, f"configuration_{index}")
    return configs


def run_in_subprocess(config):
    """Runs one configuration in a fresh Python process, so that its peak memory is its own."""
    os.makedirs(config["work_dir"], exist_ok=True)
    config_path = os.path.join(config["work_dir"], "config.json")
    with open(config_path, "w") as f:
        json.dump(config, f)
    subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", config_path], check=True, cwd=REPO_ROOT)
    with open(os.path.join(config["work_dir"], "result.json")) as f:
        result = json.load(f)
    if "sweep" in config:
        result["sweep"] = config["sweep"]
    return result


def _slope(xs, ys):
    mean_x, mean_y = statistics.mean(xs), statistics.mean(ys)
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)


def scaling_summary(rows):
    """Time per step and memory growth from the two sweeps."""
    t_rows = [row for row in rows if row["sweep"] == "T"]
    k_rows = [row for row in rows if row["sweep"] == "K"]
    summary = {}
    if len(t_rows) > 1:
        t_peaks = [row["peak_memory_mib"] for row in t_rows]
        summary["peak_memory_spread_over_T"] = max(t_peaks) / min(t_peaks) - 1
        summary["seconds_per_no_grad_step"] = _slope(
            [row["num_inference_steps"] for row in t_rows], [row["seconds_per_iteration"] for row in t_rows]
        )
    if len(k_rows) > 1:
        grad_steps = [row["num_grad_steps"] for row in k_rows]
        summary["extra_seconds_per_gradient_step"] = _slope(grad_steps, [row["seconds_per_iteration"] for row in k_rows])
        summary["peak_memory_mib_per_gradient_step"] = _slope(grad_steps, [row["peak_memory_mib"] for row in k_rows])
    return summary


def print_tables(report):
    rows = report["configurations"]
    header = f"{'configuration':<16} {'T':>3} {'K':>3} {'s/iter':>9} {'isolated s':>10} {'overhead':>8} {'peak MiB':>9} {'setup MiB':>9}"
    print(header)
    print("-" * len(header))
    for row in rows:
        isolated = f"{row['isolated_total_seconds']:.3f}" if "isolated_total_seconds" in row else "-"
        overhead = f"{row['overhead_ratio']:.3f}" if "overhead_ratio" in row else "-"
        print(
            f"{row['name']:<16} {row['num_inference_steps']:>3} {row['num_grad_steps']:>3} {row['seconds_per_iteration']:>9.3f} "
            f"{isolated:>10} {overhead:>8} {row['peak_memory_mib']:>9.0f} {row['memory_after_setup_mib']:>9.0f}"
        )
    if not any("sweep" in row for row in rows):
        # Per configuration: its phases inside the iteration, then (when timed) the same phases in isolation.
        columns = [(row, "phases_in_iteration") for row in rows]
        columns += [(row, "phases_isolated") for row in rows if "phases_isolated" in row]
        columns.sort(key=lambda column: rows.index(column[0]))
        print()
        print(f"{'phase (s)':<20}" + "".join(
            f" {row['name'][:12] + (' isolated' if key == 'phases_isolated' else ' in iter.'):>22}" for row, key in columns
        ))
        for phase in ITERATION_PHASES:
            print(f"{phase:<20}" + "".join(f" {row[key].get(phase, 0.0):>22.3f}" for row, key in columns))
        untimed = [row["untimed_in_iteration"] if key == "phases_in_iteration" else 0.0 for row, key in columns]
        print(f"{'(outside phases)':<20}" + "".join(f" {cell:>22.3f}" for cell in untimed))
        totals = [
            row["seconds_per_iteration"] if key == "phases_in_iteration" else row["isolated_total_seconds"]
            for row, key in columns
        ]
        print(f"{'total':<20}" + "".join(f" {cell:>22.3f}" for cell in totals))
    if "reference_comparison" in report:
        comparison = report["reference_comparison"]
        print()
        print(
            f"reference style / ours: time {comparison['time_ratio']:.3f}x, peak memory {comparison['peak_memory_ratio']:.3f}x "
            f"({comparison['peak_memory_difference_mib']:+.0f} MiB)"
        )
    if "scaling" in report:
        print()
        for key, value in report["scaling"].items():
            print(f"{key}: {value:.4g}")


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO)
    if args.worker is not None:
        with open(args.worker) as f:
            config = json.load(f)
        result = run_configuration(config)
        with open(os.path.join(config["work_dir"], "result.json"), "w") as f:
            json.dump(result, f)
        return

    paths = prepare_models(args.arch, args.model_dir, args.seed)
    with tempfile.TemporaryDirectory(prefix="bench_iteration_") as work_dir:
        rows = [run_in_subprocess(config) for config in configurations(args, paths, work_dir)]
    report = dict(
        date=datetime.date.today().isoformat(),
        device=torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        cpu_count=os.cpu_count(),
        torch=torch.__version__,
        command=" ".join([os.path.relpath(__file__, REPO_ROOT), *(argv if argv is not None else sys.argv[1:])]),
        configurations=rows,
    )
    if args.reference_style:
        ours, reference = rows
        report["reference_comparison"] = dict(
            time_ratio=reference["seconds_per_iteration"] / ours["seconds_per_iteration"],
            peak_memory_ratio=reference["peak_memory_mib"] / ours["peak_memory_mib"],
            peak_memory_difference_mib=reference["peak_memory_mib"] - ours["peak_memory_mib"],
        )
    if args.scaling:
        report["scaling"] = scaling_summary(rows)
    print_tables(report)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
