"""Pretrain the shapes world's models, deterministically, into ``--world_dir`` (cached: a finished world is reused).

* ``WORLD/sd``: a Stable Diffusion pipeline folder — ``AutoencoderKL`` (32 px ↔ 16 × 16 × 4 latents),
  ``CLIPTextModel`` with the real CLIP BPE tokenizer, ``UNet2DConditionModel``, SD's DDPM schedule — that
  ``train_comat.py --pretrained_model_name_or_path WORLD/sd`` takes as it takes SD1.5. The text encoder and UNet
  are trained together on the pretraining split (held-out colour–shape pairs only alone; see ``world.py``), with
  10% empty prompts for classifier-free guidance, briefly enough that binding stays imperfect.
* ``WORLD/blip``: a ``BlipForConditionalGeneration`` captioner trained on every kind of scene with the caption
  ``"a photography of " + prompt``, through the very loss CoMat scores with (``CaptionScorer``). Half of its images
  are the world VAE's reconstructions, and all are randomly blurred, colour-jittered and noised: a captioner trained
  on clean renders only reads the world perfectly but its gradient barely says how to bind (see
  ``reward_probe.py``); CoMat follows that gradient.
* ``WORLD/blip-mixup``: that captioner fine-tuned with mixup between two colourings of a scene (``mixup_captioner``):
  the main table's captioner. Between a swapped binding and the right one the world's captioner's loss rises before
  it falls and CoMat does not cross that ridge (``binding_path.py``); this one's falls along the way.

``--captioner_seed N`` also trains another captioner alike with seed N (``WORLD/blip-seedN``),
``--adversarial_captioner EPS`` an adversarially fine-tuned one (``WORLD/blip-adversarial-EPS``), and
``--per_object_mixup_captioner`` one fine-tuned with mixup object by object (``WORLD/blip-mixup-per-object``: no
ridge on any path).

Each part is cached with the settings it was built with (``world_complete.json``): changing the captioner's
recipe retrains the captioners only. The build runs on ``BUILD_THREADS`` CPU threads whatever ``OMP_NUM_THREADS``
says, so that the same command builds the same world bit for bit on any machine of the same kind. Each part records
the machine it was built on and ``weights_sha256``, a fingerprint of its saved weights: two builds with the same
fingerprints are the same world.

    OMP_NUM_THREADS=2 python -m benchmarks.efficacy.pretrain --world_dir world
"""

import argparse
import contextlib
import hashlib
import itertools
import json
import logging
import math
import os
import platform
import time

import numpy as np
import torch

from benchmarks.efficacy import world
from utils.concept_matching import CaptionScorer, caption_nll
from utils.tiny_models import _clip_text_config, blip_tokenizer, clip_tokenizer, sd_scheduler

logger = logging.getLogger(__name__)

COMPLETE_MARKER = "world_complete.json"
CAPTION_PREFIX = "a photography of"
RECIPES = {
    # steps and sizes; "quick" checks the mechanics in the test suite in seconds (its models are not useful).
    "full": dict(vae_steps=500, vae_batch_size=32, unet_steps=2200, captioner_steps=1500, batch_size=64, dataset_size=24000, check_images=500,
                 mixup_steps=600, mixup_batch_size=32, mixup_dataset_size=8000, mixup_check_images=200),
    "quick": dict(vae_steps=4, vae_batch_size=8, unet_steps=4, captioner_steps=4, batch_size=8, dataset_size=64, check_images=8,
                  mixup_steps=2, mixup_batch_size=4, mixup_dataset_size=8, mixup_check_images=4),
}
# The world is the same bit for bit only when built on the same number of threads (build_threads), whatever the machine's.
BUILD_THREADS = 2
CONDITION_DROPOUT = 0.1  # share of empty prompts in the generator's training, for classifier-free guidance
GENERATOR_SETTINGS = ("vae_steps", "vae_batch_size", "unet_steps", "batch_size", "dataset_size", "check_images")
CAPTIONER_SETTINGS = ("captioner_steps", "batch_size", "dataset_size", "check_images")
MIXUP_SETTINGS = ("mixup_steps", "mixup_batch_size", "mixup_dataset_size", "mixup_check_images")
# The parts of a world in build order; each is trained from the ones before it (the captioners see the VAE's
# reconstructions; the mixup captioner starts from the world's captioner), so a part rebuilt rebuilds those after it.
WORLD_PARTS = ("generator", "captioner", "mixup_captioner")
# The captioner's image augmentation: half VAE reconstructions; Gaussian blur of sigma up to BLUR px on half the
# images; brightness ± 5% and per-channel offsets ± 5%; Gaussian noise of sigma up to NOISE.
CAPTIONER_AUGMENTATION = dict(reconstructed_share=0.5, blur=1.2, jitter=0.05, noise=0.15)


def images_to_tensor(images):
    """uint8 ``[N, H, W, 3]`` → float ``[N, 3, H, W]`` in [0, 1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0


def dataset(sample_fn, size, seed):
    rng = np.random.default_rng(seed)
    images, prompts = zip(*(sample_fn(rng) for _ in range(size)))
    return images_to_tensor(images), list(prompts)


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64), layers_per_block=1, latent_channels=4, norm_num_groups=16, sample_size=world.IMAGE_SIZE,
    )


@torch.no_grad()
def reconstruction_accuracy(vae, images, prompts):
    """Share of images whose VAE reconstruction the judge still reads as their prompt."""
    reconstructed = vae.decode(vae.encode(images * 2 - 1).latent_dist.mean).sample
    arrays = ((reconstructed / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return float(np.mean([world.judge(array, prompt)["full_prompt"] for array, prompt in zip(arrays, prompts)]))


def build_unet(cross_attention_dim):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=world.IMAGE_SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        # attention_head_dim is diffusers' (legacy) name for the number of heads: 2 heads of 16 and 32 channels.
        cross_attention_dim=cross_attention_dim, attention_head_dim=2, norm_num_groups=8,
    )


def cosine_lr(optimizer, steps, warmup=50):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))
    )


def descend(loss, optimizer, schedule=None, clip=None):
    """One optimizer step on ``loss`` (gradients of ``clip`` clipped to norm 1 first, when given)."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(clip, 1.0)
    optimizer.step()
    if schedule is not None:
        schedule.step()


@torch.no_grad()
def encode_means(vae, images):
    """The VAE posterior means of images in [0, 1] (unscaled), in chunks of 512."""
    return torch.cat([vae.encode(images[i : i + 512] * 2 - 1).latent_dist.mean for i in range(0, len(images), 512)])


def denoising_loss(unet, scheduler, clean, encoder_hidden_states, generator):
    """Epsilon-prediction MSE of ``unet`` on ``clean`` latents noised at uniformly drawn training timesteps."""
    noise = torch.randn(clean.shape, generator=generator)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(clean),), generator=generator)
    prediction = unet(scheduler.add_noise(clean, noise, timesteps), timesteps, encoder_hidden_states=encoder_hidden_states).sample
    return torch.nn.functional.mse_loss(prediction, noise)


def train_vae(images, steps, batch_size, generator):
    vae = build_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    schedule = cosine_lr(optimizer, steps)
    for step in range(steps):
        batch = images[torch.randint(len(images), (batch_size,), generator=generator)] * 2 - 1
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        loss = torch.nn.functional.mse_loss(reconstruction, batch) + 1e-6 * posterior.kl().mean()
        descend(loss, optimizer, schedule)
        if step % 200 == 0 or step == steps - 1:
            logger.info(f"VAE step {step}: reconstruction MSE {loss.item():.5f}")
    vae.eval().requires_grad_(False)
    latents = encode_means(vae, images)
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return vae, latents * vae.config.scaling_factor


def train_generator(latents, prompts, steps, batch_size, generator):
    """The text encoder and the UNet, trained together (epsilon prediction, SD's schedule, 10% empty prompts)."""
    from transformers import CLIPTextModel

    tokenizer = clip_tokenizer()
    config = _clip_text_config()
    config.update(dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=2))
    text_encoder = CLIPTextModel(config)
    unet = build_unet(config.hidden_size)
    scheduler = sd_scheduler()
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=1e-3, weight_decay=1e-2)
    schedule = cosine_lr(optimizer, steps)
    token_ids = tokenizer(prompts + [""], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    empty = len(prompts)
    start = time.perf_counter()
    for step in range(steps):
        index = torch.randint(len(prompts), (batch_size,), generator=generator)
        dropped = torch.rand(batch_size, generator=generator) < CONDITION_DROPOUT
        ids = token_ids[torch.where(dropped, torch.full_like(index, empty), index)]
        loss = denoising_loss(unet, scheduler, latents[index], text_encoder(ids)[0], generator)
        descend(loss, optimizer, schedule, clip=parameters)
        if step % 250 == 0 or step == steps - 1:
            logger.info(f"UNet step {step}: loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)")
    return tokenizer, text_encoder.eval().requires_grad_(False), unet.eval().requires_grad_(False), scheduler


def build_captioner():
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    tokenizer = blip_tokenizer()
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  image_size=world.IMAGE_SIZE, patch_size=4)
    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                encoder_hidden_size=64, bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
                sep_token_id=tokenizer.sep_token_id, max_position_embeddings=32)
    model = BlipForConditionalGeneration(BlipConfig(vision_config=vision, text_config=text))
    processor = BlipProcessor(image_processor=BlipImageProcessor(
        size={"height": world.IMAGE_SIZE, "width": world.IMAGE_SIZE},
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    ), tokenizer=tokenizer)
    return model, processor


def _gaussian_blur(images, sigmas):
    """Per-image separable Gaussian blur (5 taps) of ``images`` [B, 3, H, W] with standard deviations ``sigmas`` [B]."""
    taps = torch.arange(-2, 3, dtype=torch.float32)
    kernels = torch.exp(-(taps[None] ** 2) / (2 * sigmas[:, None] ** 2 + 1e-6))
    kernels = (kernels / kernels.sum(dim=1, keepdim=True)).repeat_interleave(3, dim=0)[:, None, None, :]  # [B*3, 1, 1, 5]
    batch, _, height, width = images.shape
    flat = images.reshape(1, batch * 3, height, width)
    flat = torch.nn.functional.conv2d(torch.nn.functional.pad(flat, (2, 2, 0, 0), mode="replicate"), kernels, groups=batch * 3)
    flat = torch.nn.functional.conv2d(torch.nn.functional.pad(flat, (0, 0, 2, 2), mode="replicate"), kernels.transpose(2, 3), groups=batch * 3)
    return flat.reshape(images.shape)


def augment(images, reconstructions, generator, settings=CAPTIONER_AUGMENTATION):
    """The captioner's training images: see :data:`CAPTIONER_AUGMENTATION`."""
    batch = images.shape[0]

    def uniform(*shape):
        return torch.rand(shape, generator=generator)

    images = torch.where((uniform(batch) < settings["reconstructed_share"])[:, None, None, None], reconstructions, images)
    images = torch.where((uniform(batch) < 0.5)[:, None, None, None], _gaussian_blur(images, uniform(batch) * settings["blur"]), images)
    images = images * (1 + 2 * settings["jitter"] * (uniform(batch, 1, 1, 1) - 0.5)) + 2 * settings["jitter"] * (uniform(batch, 3, 1, 1) - 0.5)
    images = images + torch.randn(images.shape, generator=generator) * uniform(batch, 1, 1, 1) * settings["noise"]
    return images.clamp(0, 1)


@torch.no_grad()
def reconstruct(vae, images):
    return torch.cat([(vae(images[i : i + 512] * 2 - 1).sample / 2 + 0.5).clamp(0, 1) for i in range(0, len(images), 512)])


def train_captioner(images, reconstructions, prompts, steps, batch_size, generator):
    model, processor = build_captioner()
    size = processor.image_processor.size
    scorer = CaptionScorer(model, processor.tokenizer, (size["height"], size["width"]), processor.image_processor.image_mean,
                           processor.image_processor.image_std, prefix=CAPTION_PREFIX)
    model.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=1e-2)
    schedule = cosine_lr(optimizer, steps)
    for step in range(steps):
        index = torch.randint(len(prompts), (batch_size,), generator=generator).tolist()
        pixel_values = scorer.preprocess(augment(images[index], reconstructions[index], generator))
        input_ids, attention_mask, labels = scorer.tokenize([prompts[i] for i in index])
        logits = model(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask).logits
        loss = caption_nll(logits, labels, "sum")
        descend(loss, optimizer, schedule)
        if step % 250 == 0 or step == steps - 1:
            logger.info(f"Captioner step {step}: loss {loss.item():.4f}")
    return model.eval().requires_grad_(False), processor


def load_world_captioner(world_dir):
    """The world's captioner (``WORLD/blip``) to fine-tune: (model, processor, its ``CaptionScorer``)."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    captioner_dir = os.path.join(world_dir, "blip")
    model = BlipForConditionalGeneration.from_pretrained(captioner_dir)
    processor = BlipProcessor.from_pretrained(captioner_dir)
    size = processor.image_processor.size
    scorer = CaptionScorer(model, processor.tokenizer, (size["height"], size["width"]), processor.image_processor.image_mean,
                           processor.image_processor.image_std, prefix=CAPTION_PREFIX)
    return model, processor, scorer


def adversarial_captioner(world_dir, epsilon, steps, batch_size=64, dataset_size=8000, check_images=200, seed=7):
    """Fine-tunes the world's captioner on adversarial images and saves it to ``WORLD/blip-adversarial-EPS``.

    Each step perturbs the augmented training images within an L∞ ball of ``epsilon``/255 by one signed-gradient
    step from a random start (FGSM-RS, Wong et al. 2020) towards a higher caption loss, then trains on them. A robust
    model's input gradient tends to point at what the labels describe (Santurkar et al. 2019), which is what CoMat's
    caption reward needs (README, the reward probe). Returns the folder and the share of fresh two-object images
    whose true caption it prefers to the attribute-swapped one."""
    from diffusers import AutoencoderKL

    model, processor, scorer = load_world_captioner(world_dir)
    generator = torch.Generator().manual_seed(seed)
    vae = AutoencoderKL.from_pretrained(os.path.join(world_dir, "sd"), subfolder="vae").eval()
    images, prompts = dataset(world.captioner_sample, dataset_size, seed)
    reconstructions = reconstruct(vae, images)
    radius = epsilon / 255
    model.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=1e-2)
    for step in range(steps):
        index = torch.randint(len(prompts), (batch_size,), generator=generator).tolist()
        clean = augment(images[index], reconstructions[index], generator)
        input_ids, attention_mask, labels = scorer.tokenize([prompts[i] for i in index])

        def caption_loss(pixels):
            logits = model(pixel_values=scorer.preprocess(pixels), input_ids=input_ids, attention_mask=attention_mask).logits
            return caption_nll(logits, labels, "sum")

        start = ((torch.rand(clean.shape, generator=generator) * 2 - 1) * radius).requires_grad_(True)
        (gradient,) = torch.autograd.grad(caption_loss((clean + start).clamp(0, 1)), start)
        perturbation = (start + 1.25 * radius * gradient.sign()).clamp(-radius, radius).detach()
        loss = caption_loss((clean + perturbation).clamp(0, 1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            logger.info(f"Adversarial captioner step {step}: loss {loss.item():.4f}")
    model.eval().requires_grad_(False)
    output = os.path.join(world_dir, f"blip-adversarial-{epsilon:g}")
    model.save_pretrained(output)
    processor.save_pretrained(output)
    return output, swap_preference(model, processor, num_images=check_images)


def binding_blends(recolourings, weights):
    """Blends of :func:`world.recolouring` pairs (A, B) and the captions that score them.

    ``weights`` ``[N, 1]``: the whole scene is λ·A + (1 − λ)·B, scored by captions A and B with weights λ and 1 − λ.
    ``weights`` ``[N, 2]``: object by object, object i is λ_i·A_i + (1 − λ_i)·B_i, scored by the four captions that take
    each object's colour from A or B (AA, AB, BA, BB) with the products of their objects' weights. Returns the blends
    ``[N, 3, H, W]``, the captions (one list of N per caption kind) and their weights ``[kinds, N]`` (summing to 1)."""
    per_object = weights.shape[1] == 2
    choices = list(itertools.product((0, 1), repeat=2)) if per_object else [(0, 0), (1, 1)]
    blends, captions, caption_weights = 0, [], []
    for choice in choices:
        objects = [[pair[pick][index] for index, pick in enumerate(choice)] for pair in recolourings]
        images = images_to_tensor([world.draw(scene, layout) for scene, (_, _, layout) in zip(objects, recolourings)])
        weight = math.prod(weights[:, k] if choice[k] == 0 else 1 - weights[:, k] for k in range(weights.shape[1]))
        blends = blends + weight[:, None, None, None] * images
        captions.append([world.prompt_of(scene) for scene in objects])
        caption_weights.append(weight)
    return blends, captions, torch.stack(caption_weights)


def mixup_captioner(world_dir, steps, batch_size, dataset_size, check_images, seed=11, per_object=False):
    """Fine-tunes the world's captioner with mixup between bindings and saves it to ``WORLD/blip-mixup`` (with
    ``per_object``, ``WORLD/blip-mixup-per-object``).

    Each step trains on a batch of the captioner's data and on as many blends λ·A + (1 − λ)·B of two colourings of one
    scene (same shapes, same layout; :func:`world.recolouring`), scored λ·NLL(caption A) + (1 − λ)·NLL(caption B)
    (mixup, Zhang et al. 2018, here between bindings), both augmented as the world's captioner is trained. The world's
    captioner reads a blend, or both objects in one colour, as neither caption: between a swapped binding and the right
    one its loss rises before it falls, and CoMat's gradient does not cross that ridge (``binding_path``). Mixup asks
    its loss to fall along the way. A whole-scene blend leaves a ridge on the paths that recolour one object first;
    ``per_object`` blends each object with its own λ (:func:`binding_blends`), which removes it. Returns
    the folder and the share of fresh two-object images whose true caption it prefers to the attribute-swapped one."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)  # BLIP's dropout
    generator, rng = torch.Generator().manual_seed(seed), np.random.default_rng(seed)
    model, processor, scorer = load_world_captioner(world_dir)
    vae = AutoencoderKL.from_pretrained(os.path.join(world_dir, "sd"), subfolder="vae").eval()
    images, prompts = dataset(world.captioner_sample, dataset_size, seed)
    reconstructions = reconstruct(vae, images)

    def caption_losses(pixels, captions):
        input_ids, attention_mask, labels = scorer.tokenize(captions)
        logits = model(pixel_values=scorer.preprocess(pixels), input_ids=input_ids, attention_mask=attention_mask).logits
        return caption_nll(logits, labels, "none")

    model.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=1e-2)
    for step in range(steps):
        index = torch.randint(len(prompts), (batch_size,), generator=generator).tolist()
        plain = caption_losses(augment(images[index], reconstructions[index], generator), [prompts[i] for i in index]).mean()
        recolourings = [world.recolouring(rng) for _ in range(batch_size)]
        blends, captions, caption_weights = binding_blends(recolourings, torch.rand(batch_size, 2 if per_object else 1, generator=generator))
        blends = augment(blends, reconstruct(vae, blends), generator)
        losses = caption_losses(blends.repeat(len(captions), 1, 1, 1), [caption for kind in captions for caption in kind])
        mixed = (caption_weights * losses.view(len(captions), batch_size)).sum(0).mean()
        optimizer.zero_grad()
        (plain + mixed).backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            logger.info(f"Mixup captioner step {step}: loss {plain.item():.4f}, on blends {mixed.item():.4f}")
    model.eval().requires_grad_(False)
    output = os.path.join(world_dir, "blip-mixup-per-object" if per_object else "blip-mixup")
    model.save_pretrained(output)
    processor.save_pretrained(output)
    return output, swap_preference(model, processor, num_images=check_images)


def train_world_captioner(world_dir, settings, seed):
    """The world's captioner recipe: ``settings["dataset_size"]`` captioner scenes and their reconstructions by the
    world's VAE, drawn with ``seed + 1``, trained for ``settings["captioner_steps"]``. Returns (model, processor)."""
    from diffusers import AutoencoderKL

    generator = torch.Generator().manual_seed(seed + 1)
    vae = AutoencoderKL.from_pretrained(os.path.join(world_dir, "sd"), subfolder="vae").eval()
    images, prompts = dataset(world.captioner_sample, settings["dataset_size"], seed + 1)
    return train_captioner(images, reconstruct(vae, images), prompts, settings["captioner_steps"], settings["batch_size"], generator)


def independent_captioner(world_dir, seed, recipe="full"):
    """Trains another captioner as the world's is trained — same recipe, another ``seed`` for its data and
    initialisation — into ``WORLD/blip-seedSEED``: whether a generator's hack of one captioner fools another trained
    alike (what an ensemble of captioners would need not to be). Returns the folder and the share of fresh two-object
    images whose true caption it prefers to the attribute-swapped one."""
    settings = RECIPES[recipe]
    with build_threads(BUILD_THREADS):
        torch.manual_seed(seed)
        captioner, processor = train_world_captioner(world_dir, settings, seed)
    output = os.path.join(world_dir, f"blip-seed{seed}")
    captioner.save_pretrained(output)
    processor.save_pretrained(output)
    return output, swap_preference(captioner, processor, num_images=settings["check_images"])


@torch.no_grad()
def swap_preference(model, processor, num_images=400, seed=12345):
    """Share of fresh two-object images whose true caption the captioner prefers to the attribute-swapped one."""
    size = processor.image_processor.size
    scorer = CaptionScorer(model, processor.tokenizer, (size["height"], size["width"]), processor.image_processor.image_mean,
                           processor.image_processor.image_std, prefix=CAPTION_PREFIX)
    rng = np.random.default_rng(seed)
    images, prompts = [], []
    while len(prompts) < num_images:
        prompt = world.TWO_OBJECT_PROMPTS[rng.integers(len(world.TWO_OBJECT_PROMPTS))]
        if world.swapped_prompt(prompt) == prompt:  # both objects the same colour: nothing to swap
            continue
        images.append(world.render(world.objects_of(prompt), rng))
        prompts.append(prompt)
    pixels = images_to_tensor(images)
    prefers_true = 0
    for prompt, image in zip(prompts, pixels):
        true_loss = scorer.loss(image[None], [prompt], "sum").item()
        swapped_loss = scorer.loss(image[None], [world.swapped_prompt(prompt)], "sum").item()
        prefers_true += true_loss < swapped_loss
    return prefers_true / num_images


def build_machine():
    """Where a part of the world was built: the world is the same bit for bit on one machine, not on every CPU (the
    kernels torch picks for the instruction set change the bits; research log, twenty-first session)."""
    cpu = platform.processor()
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return dict(cpu=cpu, cpu_capability=torch.backends.cpu.get_cpu_capability(), torch=torch.__version__)


def weights_fingerprint(folder):
    """The first 16 hex digits of a SHA-256 over the ``.safetensors`` files under ``folder`` (relative paths and bytes,
    in sorted order): equal for two builds of a world part exactly when their weights are equal bit for bit."""
    digest = hashlib.sha256()
    paths = sorted(os.path.relpath(os.path.join(root, name), folder) for root, _, names in os.walk(folder)
                   for name in names if name.endswith(".safetensors"))
    for path in paths:
        digest.update(path.encode())
        with open(os.path.join(folder, path), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def build_threads(count):
    """Runs the block on ``count`` CPU threads: float sums split over another number of threads round differently,
    and 2,000 training steps grow that into another world (same seed, same machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def world_part_settings(recipe, seed):
    """Per part of the world, the settings it is built with (what ``world_complete.json`` records)."""
    settings = dict(RECIPES[recipe], recipe=recipe, seed=seed)
    return {
        "generator": {key: settings[key] for key in (*GENERATOR_SETTINGS, "recipe", "seed")},
        "captioner": {key: settings[key] for key in (*CAPTIONER_SETTINGS, "recipe", "seed")} | {"augmentation": CAPTIONER_AUGMENTATION},
        "mixup_captioner": {key: settings[key] for key in (*MIXUP_SETTINGS, "recipe", "seed")},
    }


def reusable_parts(built, wanted):
    """The parts of a built world's summary that can be reused: in build order, each built with the wanted settings,
    up to the first that was not (those after it are trained from it)."""
    reusable = {}
    for part in WORLD_PARTS:
        if built.get(part, {}).get("settings") != wanted[part]:
            break
        reusable[part] = built[part]
    return reusable


def build_world(world_dir, recipe="full", seed=0):
    """Train and save every model of the world into ``world_dir``: the Stable Diffusion folder ``sd``, the captioner
    ``blip`` and the captioner fine-tuned with mixup between bindings ``blip-mixup``. A part already built with the
    same settings, after parts all reused, is reused. Returns the summary written to ``world_complete.json``."""
    from diffusers import StableDiffusionPipeline

    settings = dict(RECIPES[recipe], recipe=recipe, seed=seed)
    wanted = world_part_settings(recipe, seed)
    marker = os.path.join(world_dir, COMPLETE_MARKER)
    summary = {}
    if os.path.isfile(marker):
        with open(marker) as f:
            summary = reusable_parts(json.load(f), wanted)
    if set(summary) == set(WORLD_PARTS):
        logger.info(f"World models found complete in {world_dir}")
        return summary
    os.makedirs(world_dir, exist_ok=True)
    machine = build_machine()
    with build_threads(BUILD_THREADS):
        torch.manual_seed(seed)
        checked = settings["check_images"]

        if "generator" not in summary:
            start = time.perf_counter()
            generator = torch.Generator().manual_seed(seed)
            images, prompts = dataset(world.pretraining_sample, settings["dataset_size"], seed)
            vae, latents = train_vae(images, settings["vae_steps"], settings["vae_batch_size"], generator)
            vae_accuracy = reconstruction_accuracy(vae, images[:checked], prompts[:checked])
            logger.info(f"VAE: the judge reads {100 * vae_accuracy:.1f}% of reconstructed images right")
            vae_seconds = time.perf_counter() - start
            tokenizer, text_encoder, unet, scheduler = train_generator(latents, prompts, settings["unet_steps"], settings["batch_size"], generator)
            StableDiffusionPipeline(
                vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            ).save_pretrained(os.path.join(world_dir, "sd"))
            summary["generator"] = dict(settings=wanted["generator"], threads=BUILD_THREADS, machine=machine,
                                        weights_sha256=weights_fingerprint(os.path.join(world_dir, "sd")),
                                        vae_reconstruction_judge_accuracy=vae_accuracy,
                                        seconds=dict(vae=vae_seconds, generator=time.perf_counter() - start - vae_seconds))
            _write_summary(marker, summary)

        if "captioner" not in summary:
            start = time.perf_counter()
            captioner, processor = train_world_captioner(world_dir, settings, seed)
            captioner.save_pretrained(os.path.join(world_dir, "blip"))
            processor.save_pretrained(os.path.join(world_dir, "blip"))
            summary["captioner"] = dict(settings=wanted["captioner"], threads=BUILD_THREADS, machine=machine,
                                        weights_sha256=weights_fingerprint(os.path.join(world_dir, "blip")),
                                        seconds=time.perf_counter() - start,
                                        prefers_true_caption=swap_preference(captioner, processor, num_images=checked))
            _write_summary(marker, summary)

        start = time.perf_counter()
        output, prefers_true = mixup_captioner(world_dir, settings["mixup_steps"], settings["mixup_batch_size"], settings["mixup_dataset_size"],
                                               settings["mixup_check_images"])
        summary["mixup_captioner"] = dict(settings=wanted["mixup_captioner"], threads=BUILD_THREADS, machine=machine,
                                          weights_sha256=weights_fingerprint(output),
                                          seconds=time.perf_counter() - start,
                                          prefers_true_caption=prefers_true)
        _write_summary(marker, summary)
    logger.info(f"World built: {summary}")
    return summary


def _write_summary(marker, summary):
    with open(marker, "w") as f:
        json.dump(summary, f, indent=2)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world_dir", default="world", help="Where the world's models are written (default: world).")
    parser.add_argument("--quick", action="store_true", help="A few steps of each model: checks the mechanics only.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the data and the initialisation.")
    parser.add_argument("--adversarial_captioner", type=float, default=None, help="Also fine-tune the captioner adversarially with this L-inf radius (in 1/255) into WORLD_DIR/blip-adversarial-EPS (default: no).")
    parser.add_argument("--adversarial_steps", type=int, default=600, help="Steps of that fine-tune (default: 600).")
    parser.add_argument("--per_object_mixup_captioner", action="store_true", help="Also fine-tune the world's captioner with mixup object by object into WORLD_DIR/blip-mixup-per-object, with the recipe's mixup settings (default: no; the world's blip-mixup mixes the whole scene).")
    parser.add_argument("--captioner_seed", type=int, default=None, help="Also train another captioner with this seed (data and initialisation) into WORLD_DIR/blip-seedN: does a hack of one captioner fool another? (default: no).")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO)
    torch.set_flush_denormal(True)  # subnormal gradients cost CPUs a microcode assist each
    print(json.dumps(build_world(args.world_dir, "quick" if args.quick else "full", args.seed), indent=2))
    if args.adversarial_captioner is not None:
        output, prefers_true = adversarial_captioner(args.world_dir, args.adversarial_captioner, args.adversarial_steps)
        print(f"{output}: prefers the true caption on {100 * prefers_true:.1f}% of 200 fresh two-object images")
    if args.per_object_mixup_captioner:
        settings = RECIPES["quick" if args.quick else "full"]
        with build_threads(BUILD_THREADS):
            output, prefers_true = mixup_captioner(args.world_dir, settings["mixup_steps"], settings["mixup_batch_size"], settings["mixup_dataset_size"],
                                                   settings["mixup_check_images"], per_object=True)
        print(f"{output}: prefers the true caption on {100 * prefers_true:.1f}% of {settings['mixup_check_images']} fresh two-object images")
    if args.captioner_seed is not None:
        output, prefers_true = independent_captioner(args.world_dir, args.captioner_seed, "quick" if args.quick else "full")
        print(f"{output}: prefers the true caption on {100 * prefers_true:.1f}% of fresh two-object images")


if __name__ == "__main__":
    main()
