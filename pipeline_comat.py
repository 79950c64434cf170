#!/usr/bin/env python
"""CoMat inference: a diffusers community pipeline for SD 1.x/2.x and SDXL bases with a CoMat LoRA.

Loading — one file, both families::

    pipe = DiffusionPipeline.from_pretrained(
        base, custom_pipeline="path/to/pipeline_comat.py", trust_remote_code=True
    )
    pipe.load_lora_weights("comat-sd15")  # a CoMat LoRA folder or Hub repo

diffusers imports a community file and takes the *only* ``DiffusionPipeline`` subclass defined in it as the
pipeline class, before any component is loaded. That class is :class:`CoMatPipeline`: its ``__init__``
declares the union of the SD and SDXL components, so ``from_pretrained`` loads whatever the base checkpoint
has, and its ``__new__`` hands the loaded components to the stock pipeline of their family, extended with
:class:`CoMatPipelineMixin` — ``CoMatStableDiffusionPipeline`` or ``CoMatStableDiffusionXLPipeline``
(see :func:`comat_pipeline_class`). The returned pipeline therefore *is* a ``StableDiffusionPipeline`` or
``StableDiffusionXLPipeline``: generation, LoRA loading, offloading and ``components`` are the stock code,
and its images equal a stock pipeline's with the same LoRA and seed.

What CoMat adds:

* :meth:`CoMatPipelineMixin.token_activations` — the paper's diagnostic: how much cross-attention each
  prompt token receives, averaged over pixels, heads, layers and denoising steps, plus per-token heatmaps,
  with the LoRA disabled ("base") and enabled ("comat") on the same model and seed. The maps come from
  ``utils.attention_capture``, the capture the training losses use. :func:`save_token_activation_plot`
  draws them.
* :func:`push_lora_to_hub` (``utils.hub``, shared with the training scripts' ``--push_to_hub``) — uploads a
  LoRA folder with its model card.

Command line::

    python pipeline_comat.py generate --base_model BASE --lora comat-sd15 --prompt "a red book and a yellow vase"
    python pipeline_comat.py activations --base_model BASE --lora comat-sd15 --prompt "a red book and a yellow vase"
    python pipeline_comat.py push --lora_dir comat-sd15 --repo_id your-name/comat-sd15
    python pipeline_comat.py evaluate --base_model BASE --lora comat-sd15 --prompts builtin:color --output_dir eval

``evaluate`` answers "did my LoRA improve alignment, where, and by how much": the base model and each LoRA render
the same prompts with the same seeds, real-model scorers (``utils.scorers``: BLIP-VQA, GroundingDINO, CLIPScore)
score every image, and each category's table gives means with bootstrap 95% confidence intervals and the paired
difference to the base model (``utils.evaluation``).
"""

import argparse
import contextlib
import functools
import importlib
import inspect
import json
import math
import os
import re
from dataclasses import dataclass

if not __package__:  # run as a script or imported from the project folder (see below)
    importlib.import_module("utils")  # first: it hides expected library warnings before diffusers loads

import huggingface_hub.constants
import huggingface_hub.errors
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DiffusionPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from diffusers.schedulers import KarrasDiffusionSchedulers
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import (
    CLIPImageProcessor,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

# diffusers imports a community pipeline from a copy in its modules cache (HF_MODULES_CACHE/diffusers_modules),
# where the project folder is usually not on sys.path. For *relative* imports it copies the imported files
# along (utils/attention_capture.py and utils/hub.py land next to the copy), so the package-relative form works
# there wherever the caller runs from. Run as a script or imported from the project folder, this module has no
# package and imports the project's utils package. That import is spelled with importlib because diffusers'
# requirements check reads every `from X import` line and would ask to `pip install utils` whenever the project
# folder is not on sys.path, although the relative branch is then the one that runs.
if __package__:
    from .utils.attention_capture import install_attention_capture, remove_attention_capture
    from .utils.hub import TOKEN_ON_COMMAND_LINE, push_lora_to_hub, read_model_card_inputs
    from .utils.model_loading import describe_load_failure
else:
    _attention_capture = importlib.import_module("utils.attention_capture")
    install_attention_capture = _attention_capture.install_attention_capture
    remove_attention_capture = _attention_capture.remove_attention_capture
    _hub = importlib.import_module("utils.hub")
    push_lora_to_hub, TOKEN_ON_COMMAND_LINE = _hub.push_lora_to_hub, _hub.TOKEN_ON_COMMAND_LINE
    read_model_card_inputs = _hub.read_model_card_inputs
    describe_load_failure = importlib.import_module("utils.model_loading").describe_load_failure

# Every cross-attention layer: the paper's diagnostic averages over all of them.
ALL_CROSS_ATTENTION_LAYERS = "down,mid,up"
VARIANT_LABELS = {"base": "base", "comat": "CoMat"}


@dataclass
class TokenActivations:
    """Cross-attention of one generation, averaged over heads, captured layers and denoising steps.

    Only the conditional (prompt) branch of classifier-free guidance is captured. Sequence positions are those
    of the text encoder's padded input: start token, the prompt's tokens, end token, padding.

    Attributes:
        prompt: the prompt.
        tokens: the tokenizer's token at every sequence position.
        prompt_positions: the sequence positions of the prompt's own tokens (without start, end and padding).
        activations: ``[sequence]``, the attention each position receives, averaged over pixels, heads, layers
            and steps. Every pixel's attention is a distribution over the sequence, so this sums to 1; most of
            it goes to the start token, as usual for CLIP-conditioned UNets.
        heatmaps: ``[sequence, side, side]``, each pixel's attention per position, averaged over heads, layers
            and steps, at the side of the largest captured map (smaller maps upsampled bilinearly). Each
            pixel's values sum to 1 over the sequence.
        image: the generated image.
        lora_enabled: whether the LoRA was enabled for this generation.
    """

    prompt: str
    tokens: list[str]
    prompt_positions: list[int]
    activations: torch.Tensor
    heatmaps: torch.Tensor
    image: PIL.Image.Image
    lora_enabled: bool

    @property
    def prompt_tokens(self) -> list[str]:
        """The prompt's tokens as text (CLIP marks word ends with ``</w>``; that mark is dropped)."""
        return [self.tokens[position].replace("</w>", "") for position in self.prompt_positions]

    @property
    def prompt_activations(self) -> torch.Tensor:
        """``[prompt tokens]``: :attr:`activations` of the prompt's own tokens."""
        return self.activations[self.prompt_positions]

    @property
    def prompt_heatmaps(self) -> torch.Tensor:
        """``[prompt tokens, side, side]``: :attr:`heatmaps` of the prompt's own tokens."""
        return self.heatmaps[self.prompt_positions]


@contextlib.contextmanager
def lora_at_or_below_timestep(unet, max_lora_timestep: float):
    """Inside the block the UNet's adapters are on exactly for its calls at timesteps ≤ ``max_lora_timestep`` (off
    above it, where the base model draws); their on/off state is restored after it."""
    tuner_layers = [module for module in unet.modules() if isinstance(module, BaseTunerLayer)]
    was_disabled = [layer.disable_adapters for layer in tuner_layers]

    def switch(module, args, kwargs):
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        lora_on = float(timestep) <= max_lora_timestep
        for layer in tuner_layers:
            layer.enable_adapters(lora_on)

    handle = unet.register_forward_pre_hook(switch, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        for layer, disabled in zip(tuner_layers, was_disabled, strict=True):
            layer.enable_adapters(not disabled)


class CoMatPipelineMixin:
    """What CoMat adds to a stock Stable Diffusion (XL) pipeline; see :func:`comat_pipeline_class`."""

    @contextlib.contextmanager
    def lora_start(self, fraction: float):
        """Inside the block the base model draws the first ``fraction`` of the noise schedule (timesteps above
        ``(1 - fraction)`` of the training schedule's) and the LoRA the rest. In the shapes world a CoMat LoRA's layouts
        are decided, and lost, in the first steps, and its binding gain made after them: with 0.1 (the first 2 of 20
        steps) five LoRAs kept their mean gain with the base model's variety of layouts (README, "Does it work?")."""
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"lora_start must be between 0 (the LoRA throughout) and 1 (the base model), got {fraction}.")
        with lora_at_or_below_timestep(self.unet, (1.0 - fraction) * self.scheduler.config.num_train_timesteps - 1):
            yield

    @torch.no_grad()
    def token_activations(
        self,
        prompt: str,
        *,
        num_inference_steps: int = 50,
        guidance_scale: float | None = None,
        resolution: int | None = None,
        seed: int = 0,
        negative_prompt: str | None = None,
        attention_layers: str = ALL_CROSS_ATTENTION_LAYERS,
    ) -> dict[str, TokenActivations]:
        """Generates ``prompt`` with the LoRA disabled and enabled and measures each token's cross-attention.

        Both generations start from the same noise (``seed``). Capturing does not change the images: they
        equal ordinary calls of the pipeline with the same arguments.

        Args:
            prompt: the prompt.
            num_inference_steps: denoising steps; every step is captured.
            guidance_scale: classifier-free guidance scale. Default: the pipeline's.
            resolution: side of the (square) image in pixels. Default: the UNet's native size.
            seed: seed of the initial noise (a CPU generator, so results do not depend on the device).
            negative_prompt: the negative prompt.
            attention_layers: the cross-attention layers to average, in ``--attention_layers`` syntax
                (``utils.attention_capture``). Default: all of them.

        Returns:
            ``{"base": ..., "comat": ...}``; only ``"base"`` when no LoRA is loaded. The pipeline's LoRA is left
            enabled or disabled as it was.
        """
        lora_layers = self._unet_lora_layers()
        if any(layer.merged for layer in lora_layers):
            raise ValueError("token_activations needs an unfused LoRA to disable it: call pipe.unfuse_lora() first.")
        resolution = resolution or self.unet.config.sample_size * self.vae_scale_factor
        if guidance_scale is None:
            guidance_scale = inspect.signature(self.__call__).parameters["guidance_scale"].default
        # diffusers pipelines batch the UNet input as [negative; prompt] exactly when they apply guidance.
        uses_guidance = guidance_scale > 1 and self.unet.config.time_cond_proj_dim is None
        tokens, prompt_positions = self._prompt_tokens(prompt)
        store = install_attention_capture(
            self.unet,
            attention_layers,
            resolution,
            self.vae_scale_factor,
            cond_half="second" if uses_guidance else "all",
            record_without_grad=True,
        )
        variants = {"base": False, "comat": True} if lora_layers else {"base": False}
        lora_was_enabled = bool(lora_layers) and not lora_layers[0].disable_adapters
        try:
            results = {}
            for name, lora_enabled in variants.items():
                if lora_layers:
                    self._set_lora_enabled(lora_enabled)
                image, activations, heatmaps = self._generate_with_capture(
                    store,
                    heatmap_side=max(layer.side for layer in store.layers),
                    prompt=prompt,
                    negative_prompt=negative_prompt,
                    num_inference_steps=num_inference_steps,
                    guidance_scale=guidance_scale,
                    height=resolution,
                    width=resolution,
                    generator=torch.Generator(device="cpu").manual_seed(seed),
                )
                if activations.shape[0] != len(tokens):
                    raise ValueError(
                        f"The captured maps attend to {activations.shape[0]} positions but the tokenizer gives "
                        f"{len(tokens)}: this pipeline's text conditioning is not the tokenizer's sequence."
                    )
                results[name] = TokenActivations(
                    prompt, tokens, prompt_positions, activations, heatmaps, image, lora_enabled
                )
        finally:
            remove_attention_capture(self.unet, store)
            if lora_layers:
                self._set_lora_enabled(lora_was_enabled)
        return results

    def _set_lora_enabled(self, enabled):
        if enabled:
            self.enable_lora()
        else:
            self.disable_lora()

    def _unet_lora_layers(self):
        return [module for module in self.unet.modules() if isinstance(module, BaseTunerLayer)]

    def _prompt_tokens(self, prompt):
        """The tokens at every position of the text encoder's input, and the positions of the prompt's own."""
        # SDXL's two tokenizers split a prompt identically (they differ only in the padding token), and a
        # pipeline may come without the first one.
        tokenizer = self.tokenizer if self.tokenizer is not None else self.tokenizer_2
        length = tokenizer.model_max_length
        padded_ids = tokenizer(prompt, padding="max_length", max_length=length, truncation=True).input_ids
        num_ids = len(tokenizer(prompt, max_length=length, truncation=True).input_ids)
        return tokenizer.convert_ids_to_tokens(padded_ids), list(range(1, num_ids - 1))

    def _generate_with_capture(self, store, heatmap_side, **call_kwargs):
        """Runs the pipeline while ``store`` captures; returns the image and the averaged activations and heatmaps."""
        sums = {"activations": 0.0, "heatmaps": 0.0, "maps": 0}

        def accumulate(pipeline, step, timestep, callback_kwargs):
            # Reduced after every step, so memory does not grow with the number of steps.
            for step_maps in store.step_maps:
                for group_maps in step_maps.values():
                    for attention in group_maps:  # [1, heads, pixels, sequence]
                        per_pixel = attention[0].float().mean(dim=0)  # [pixels, sequence]
                        side = math.isqrt(per_pixel.shape[0])
                        heatmap = per_pixel.T.reshape(1, -1, side, side)
                        # Bilinear weights sum to one, so every pixel still holds a distribution over tokens.
                        heatmap = F.interpolate(heatmap, size=(heatmap_side, heatmap_side), mode="bilinear")
                        sums["activations"] = sums["activations"] + per_pixel.mean(dim=0)
                        sums["heatmaps"] = sums["heatmaps"] + heatmap[0]
                        sums["maps"] += 1
            store.clear()
            return callback_kwargs

        with store.capturing():
            image = self(**call_kwargs, callback_on_step_end=accumulate).images[0]
        if sums["maps"] == 0:
            raise RuntimeError("No cross-attention map was captured during generation.")
        return image, (sums["activations"] / sums["maps"]).cpu(), (sums["heatmaps"] / sums["maps"]).cpu()


@functools.cache
def comat_pipeline_class(stock_pipeline_class: type) -> type:
    """The CoMat pipeline class of a stock family: ``CoMat<stock name>``, a :class:`CoMatPipelineMixin` and a
    ``stock_pipeline_class``.

    Made on demand instead of being defined in this file, because diffusers requires a community file to
    define exactly one ``DiffusionPipeline`` subclass (:class:`CoMatPipeline`).
    """
    name = f"CoMat{stock_pipeline_class.__name__}"
    namespace = {"__module__": __name__, "__qualname__": name, "__doc__": f"{stock_pipeline_class.__name__} + CoMat."}
    return type(name, (CoMatPipelineMixin, stock_pipeline_class), namespace)


def _stock_pipeline_class(text_encoder_2):
    """SDXL checkpoints have a second text encoder; SD 1.x/2.x ones do not."""
    return StableDiffusionXLPipeline if text_encoder_2 is not None else StableDiffusionPipeline


class CoMatPipeline(DiffusionPipeline):
    r"""Loads an SD 1.x/2.x or SDXL base as its CoMat pipeline (see the module docstring).

    ``CoMatPipeline.from_pretrained(base)`` (or ``DiffusionPipeline.from_pretrained(base,
    custom_pipeline=".../pipeline_comat.py", trust_remote_code=True)``) and ``CoMatPipeline(**components)``
    return a ``CoMatStableDiffusionXLPipeline`` when the components include ``text_encoder_2`` and a
    ``CoMatStableDiffusionPipeline`` otherwise.
    """

    _optional_components = sorted(
        set(StableDiffusionPipeline._optional_components) | set(StableDiffusionXLPipeline._optional_components)
    )

    def __new__(cls, **components):
        stock_class = _stock_pipeline_class(components.get("text_encoder_2"))
        accepted = inspect.signature(stock_class.__init__).parameters
        # from_pretrained passes every component of the union, those the checkpoint lacks as None.
        foreign = sorted(name for name, value in components.items() if name not in accepted and value is not None)
        if foreign:
            raise TypeError(f"{stock_class.__name__} takes no {', '.join(foreign)}.")
        stock_components = {name: None for name in stock_class._optional_components if name in accepted}
        stock_components.update((name, value) for name, value in components.items() if name in accepted)
        # Not an instance of cls, so Python does not call CoMatPipeline.__init__ on it.
        return comat_pipeline_class(stock_class)(**stock_components)

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """The CoMat pipeline of ``pipeline``'s family, sharing its components (``DiffusionPipeline.from_pipe``)."""
        # The union signature would ask the source pipeline for the other family's components.
        stock_class = _stock_pipeline_class(getattr(pipeline, "text_encoder_2", None))
        return comat_pipeline_class(stock_class).from_pipe(pipeline, **kwargs)

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: CLIPTextModel | None,
        tokenizer: CLIPTokenizer | None,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
        text_encoder_2: CLIPTextModelWithProjection | None,
        tokenizer_2: CLIPTokenizer | None,
        safety_checker: StableDiffusionSafetyChecker | None,
        feature_extractor: CLIPImageProcessor | None,
        image_encoder: CLIPVisionModelWithProjection | None,
        requires_safety_checker: bool = True,
        force_zeros_for_empty_prompt: bool = True,
        add_watermarker: bool | None = None,
    ):
        """The union of the SD and SDXL pipelines' arguments: what ``from_pretrained`` reads to know which
        components to load. Never runs — :meth:`__new__` returns the family's pipeline instead.

        Every component is a parameter without default on purpose: ``DiffusionPipeline.from_pretrained(...,
        custom_pipeline=...)`` takes the optional components from ``DiffusionPipeline`` (none), so a component
        with a default would count as a plain keyword and a ``safety_checker=None`` given by the caller would
        not stop it from loading. Components the checkpoint lacks are passed as None (they are in
        ``_optional_components``).
        """


# ------------------------------------------------------------------------------------------------ plot


def _plain_text(text):
    # Matplotlib reads text between two dollar signs as math.
    return text.replace("$", r"\$")


def save_token_activation_plot(results: dict[str, TokenActivations], path: str) -> str:
    """Writes a PNG: a bar chart of the prompt tokens' activations per variant (base vs CoMat), and under it,
    for every variant, its image and each token's heatmap over it; returns ``path``.

    A token's heatmaps share one colour scale across variants (1 = the token's highest attention in any variant,
    shown by the colour bar), so a stronger focus shows as more intense.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(results)
    first = results[names[0]]
    tokens = [_plain_text(token) for token in first.prompt_tokens]
    num_tokens = len(tokens)
    if num_tokens == 0:
        raise ValueError("The prompt has no tokens to plot.")

    figure = Figure(figsize=(max(6.0, 1.7 * (num_tokens + 1)), 3.0 + 1.9 * len(names)))
    FigureCanvasAgg(figure)
    grid = figure.add_gridspec(
        1 + len(names), num_tokens + 2, height_ratios=[1.5] + [1.0] * len(names), width_ratios=[1.0] * (num_tokens + 1) + [0.08]
    )

    bars = figure.add_subplot(grid[0, :-1])
    bar_width = 0.8 / len(names)
    for index, name in enumerate(names):
        offset = (index - (len(names) - 1) / 2) * bar_width
        positions = [token_index + offset for token_index in range(num_tokens)]
        bars.bar(positions, results[name].prompt_activations.tolist(), bar_width, label=VARIANT_LABELS.get(name, name))
    bars.set_xticks(range(num_tokens), tokens, rotation=30 if num_tokens > 8 else 0)
    bars.set_ylabel("mean cross-attention")
    bars.set_title(f'Token activations: "{_plain_text(first.prompt)}"')
    bars.legend()

    width, height = first.image.size
    heatmaps = {
        name: F.interpolate(result.prompt_heatmaps[None], size=(height, width), mode="bilinear")[0]
        for name, result in results.items()
    }
    scale = torch.stack([heatmap.amax(dim=(1, 2)) for heatmap in heatmaps.values()]).amax(dim=0).clamp_min(1e-12)
    for row, name in enumerate(names, start=1):
        image_axes = figure.add_subplot(grid[row, 0])
        image_axes.imshow(results[name].image)
        image_axes.set_title(VARIANT_LABELS.get(name, name))
        image_axes.axis("off")
        for column, token in enumerate(tokens, start=1):
            axes = figure.add_subplot(grid[row, column])
            axes.imshow(results[name].image)
            shown = axes.imshow((heatmaps[name][column - 1] / scale[column - 1]).numpy(), cmap="jet", alpha=0.5, vmin=0, vmax=1)
            axes.set_title(token)
            axes.axis("off")
    figure.colorbar(shown, cax=figure.add_subplot(grid[1:, -1]), label="attention / token's maximum")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path


# ------------------------------------------------------------------------------------------------ command line

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _add_model_arguments(parser, several_loras=False):
    parser.add_argument("--base_model", type=str, required=True, help="Base pipeline: a Hub id or a local diffusers folder (SD 1.x/2.x or SDXL).")
    if several_loras:
        parser.add_argument("--lora", type=str, action="append", default=[], help="LoRA to compare with the base model: a folder written by train_comat.py / train_comat_sdxl.py or a Hub repo id; repeat the flag for several. Default: none (the base model alone).")
    else:
        parser.add_argument("--lora", type=str, default=None, help="CoMat LoRA: a folder written by train_comat.py / train_comat_sdxl.py or a Hub repo id. Default: none (the base model).")
    parser.add_argument("--revision", type=str, default=None, help="Git revision of the base model on the Hub.")
    parser.add_argument("--variant", type=str, default=None, help="Weight variant of the base model files, e.g. 'fp16'.")
    parser.add_argument("--device", type=str, default=None, help="Device to run on. Default: cuda if available, else cpu.")
    parser.add_argument("--dtype", type=str, default=None, choices=sorted(DTYPES), help="Weights dtype. Default: fp16 on cuda, fp32 on cpu.")
    parser.add_argument("--num_inference_steps", type=int, default=50, help="Denoising steps. Default: 50.")
    parser.add_argument("--guidance_scale", type=float, default=None, help="Classifier-free guidance scale. Default: the pipeline's (SD 7.5, SDXL 5.0).")
    parser.add_argument("--negative_prompt", type=str, default=None, help="Negative prompt.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the initial noise (image i of a prompt uses seed + i). Default: 0.")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="pipeline_comat.py",
        description="CoMat inference: generate images, measure token activations, publish a LoRA.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="{generate,activations,evaluate,push}")

    generate = commands.add_parser("generate", help="Render prompts with a base model and (optionally) a CoMat LoRA.")
    _add_model_arguments(generate)
    generate.add_argument("--prompt", type=str, action="append", required=True, help="Prompt to render; repeat the flag for several.")
    generate.add_argument("--num_images_per_prompt", type=int, default=1, help="Images per prompt.")
    generate.add_argument("--height", type=int, default=None, help="Image height in pixels. Default: the model's native size.")
    generate.add_argument("--width", type=int, default=None, help="Image width in pixels. Default: the model's native size.")
    generate.add_argument("--output_dir", type=str, default="comat-images", help="Where the PNGs are written.")
    generate.add_argument("--lora_start", type=float, default=0.0, help="Fraction of the noise schedule the base model draws before the LoRA takes over (0: the LoRA throughout, 1: the base model). In the shapes world 0.1 kept a CoMat LoRA's gain and the base model's variety of layouts (README, \"Does it work?\"). Default: 0.")

    activations = commands.add_parser("activations", help="Token activations of a prompt without and with the LoRA: a PNG plot and a JSON file.")
    _add_model_arguments(activations)
    activations.add_argument("--prompt", type=str, required=True, help="The prompt to analyse.")
    activations.add_argument("--resolution", type=int, default=None, help="Side of the square image in pixels. Default: the model's native size.")
    activations.add_argument("--attention_layers", type=str, default=ALL_CROSS_ATTENTION_LAYERS, help="Cross-attention layers averaged: comma-separated place[:side at 512 px], place in down/mid/up (as in training). Default: all.")
    activations.add_argument("--output", type=str, default="token_activations.png", help="The PNG plot; the numbers go to the same path with .json.")

    evaluate = commands.add_parser("evaluate", help="Alignment of the base model and each LoRA on the same prompts and seeds: tables with 95% confidence intervals (JSON, markdown) and image grids.")
    _add_model_arguments(evaluate, several_loras=True)
    evaluate.add_argument("--prompts", type=str, action="append", required=True, help="Prompt set: builtin:CATEGORY (color, shape, texture, spatial, non_spatial, complex; comma-separated, or 'all') or a text file with one prompt a line (a T2I-CompBench file such as color_val.txt is scored as its category). Repeat the flag for several.")
    evaluate.add_argument("--images_per_prompt", type=int, default=4, help="Images per prompt and model (seeds --seed … --seed + N - 1). Default: 4.")
    evaluate.add_argument("--max_prompts", type=int, default=None, help="Use only the first N prompts of each set. Default: all (300 per built-in category).")
    evaluate.add_argument("--resolution", type=int, default=None, help="Side of the square images in pixels. Default: the model's native size.")
    evaluate.add_argument("--batch_size", type=int, default=8, help="Images per pipeline call. Default: 8.")
    evaluate.add_argument("--output_dir", type=str, default="comat-eval", help="Where results.json, results.md, scores.jsonl and the grids are written. Default: comat-eval.")
    evaluate.add_argument("--grid_prompts", type=int, default=8, help="Prompts shown in each category's grid (first seed of each). Default: 8.")
    evaluate.add_argument("--blip_vqa_model", type=str, default="Salesforce/blip-vqa-base", help="BlipForQuestionAnswering for the colour/shape/texture score. Default: Salesforce/blip-vqa-base.")
    evaluate.add_argument("--grounding_model", type=str, default="IDEA-Research/grounding-dino-tiny", help="GroundingDINO for the spatial, presence and counting scores. Default: IDEA-Research/grounding-dino-tiny.")
    evaluate.add_argument("--clip_model", type=str, default="openai/clip-vit-large-patch14", help="CLIPModel for CLIPScore. Default: openai/clip-vit-large-patch14.")
    evaluate.add_argument("--box_threshold", type=float, default=0.35, help="GroundingDINO box score threshold of the detection scores. Default: 0.35.")
    evaluate.add_argument("--text_threshold", type=float, default=0.25, help="GroundingDINO token score threshold. Default: 0.25.")
    evaluate.add_argument("--spacy_model", type=str, default="en_core_web_sm", help="spaCy pipeline that finds the prompts' objects. Default: en_core_web_sm.")

    push = commands.add_parser("push", help="Upload a CoMat LoRA folder with its model card to the Hugging Face Hub.")
    push.add_argument("--lora_dir", type=str, required=True, help="The LoRA folder (pytorch_lora_weights.safetensors; the card is (re)written there).")
    push.add_argument("--repo_id", type=str, required=True, help="Target model repo, e.g. 'your-name/comat-sd15' (created if needed).")
    push.add_argument("--base_model", type=str, default=None, help="Base model named in the card. Default: the one the training run recorded.")
    push.add_argument("--sample_images", type=str, nargs="+", default=None, help="Images shown in the card. Default: the training run's validation images.")
    push.add_argument("--sample_prompt", type=str, default=None, help="Prompt of the sample images. Default: the training run's validation prompt.")
    push.add_argument("--private", action="store_true", help="Create the repo as private.")
    push.add_argument("--token", type=str, default=None, help="Refused (use `hf auth login` or HF_TOKEN): a token on the command line shows in `ps` and shell history.")
    push.add_argument("--commit_message", type=str, default="Upload CoMat LoRA", help="Commit message of the upload.")
    args = parser.parse_args(argv)
    if args.command == "push" and args.token is not None:
        parser.error(f"--token {TOKEN_ON_COMMAND_LINE}")
    if args.command == "generate" and not 0.0 <= args.lora_start <= 1.0:
        parser.error(f"--lora_start {args.lora_start} must be between 0 (the LoRA throughout) and 1 (the base model).")
    if args.command == "generate" and args.lora_start > 0 and not args.lora:
        parser.error("--lora_start says when the LoRA takes over: give --lora too.")
    if args.command == "evaluate":
        for flag in ("images_per_prompt", "max_prompts", "batch_size", "grid_prompts"):
            if getattr(args, flag) is not None and getattr(args, flag) < 1:
                parser.error(f"--{flag} must be at least 1, got {getattr(args, flag)}.")
        if args.resolution is not None and args.resolution % 8:
            parser.error(f"--resolution {args.resolution} is not a multiple of 8.")
    return args


def _looks_like_a_path(name):
    """A local path rather than a Hub id ("owner/name" or "name")."""
    return name.startswith((os.sep, ".", "~")) or name.count("/") > 1


def _check_model_flag(name, flag):
    """Before loading anything: a path that does not exist, or a Hub id while offline, ends the CLI with a message."""
    offline = huggingface_hub.constants.HF_HUB_OFFLINE
    if not os.path.exists(name) and (_looks_like_a_path(name) or offline):
        if _looks_like_a_path(name):
            _fail(f"{flag} {name}: no such folder.")
        _fail(describe_load_failure(name, flag))


def _load_pipeline(args, loras, keep_loras=True):
    """The pipeline of ``--base_model`` on its device with ``loras`` loaded; with ``keep_loras=False`` each LoRA is
    only checked (loaded once, then unloaded)."""
    _check_model_flag(args.base_model, "--base_model")
    for lora in loras:
        _check_model_flag(lora, "--lora")
    device, dtype = _device_and_dtype(args)
    try:
        pipeline = CoMatPipeline.from_pretrained(args.base_model, revision=args.revision, variant=args.variant, dtype=dtype)
    except (OSError, ValueError, huggingface_hub.errors.HfHubHTTPError) as error:
        _fail(describe_load_failure(args.base_model, "--base_model", error))
    for lora in loras:
        _load_lora_safetensors(pipeline, lora)
        if not keep_loras:
            pipeline.unload_lora_weights()
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


def _device_and_dtype(args):
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    return device, DTYPES[args.dtype] if args.dtype else (torch.float16 if device.startswith("cuda") else torch.float32)


def _load_lora_safetensors(pipeline, lora):
    """Load ``--lora`` from safetensors only (a pickled ``.bin`` LoRA could run code when unpickled), into a base
    of the family it was trained on."""
    import safetensors

    trained_with = read_model_card_inputs(lora).get("pipeline_class_name") if os.path.isdir(lora) else None
    is_xl = "text_encoder_2" in pipeline.components and pipeline.text_encoder_2 is not None
    if trained_with and ("XL" in trained_with) != is_xl:
        _fail(f"--lora {lora} was trained for a {trained_with} base, but --base_model is an "
              f"{'SDXL' if is_xl else 'SD 1.x/2.x'} model: use a base of the LoRA's family.")
    try:
        pipeline.load_lora_weights(lora, use_safetensors=True)
    except (OSError, ValueError, RuntimeError, safetensors.SafetensorError) as error:
        pickled = os.path.isdir(lora) and any(name.endswith(".bin") for name in os.listdir(lora))
        reason = ("it holds a pickled .bin LoRA, which this tool refuses to unpickle: convert it to safetensors"
                  if pickled else f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
        _fail(f"--lora {lora}: the LoRA could not be loaded into --base_model ({reason}).")


def _fail(message):
    """End the CLI with ``message`` alone (no traceback) and exit code 2, like argparse."""
    import sys

    print(f"pipeline_comat.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _call_arguments(args):
    """The pipeline-call flags that were given (the others keep the pipeline's defaults)."""
    given = {"guidance_scale": args.guidance_scale, "negative_prompt": args.negative_prompt}
    return {name: value for name, value in given.items() if value is not None}


def _slug(text, max_length=48):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:max_length] or "prompt"


def run_generate(args):
    pipeline = _load_pipeline(args, [args.lora] if args.lora else [])
    os.makedirs(args.output_dir, exist_ok=True)
    for prompt_index, prompt in enumerate(args.prompt):
        seeds = [args.seed + image_index for image_index in range(args.num_images_per_prompt)]
        with pipeline.lora_start(args.lora_start):
            images = pipeline(
                prompt,
                num_images_per_prompt=len(seeds),
                num_inference_steps=args.num_inference_steps,
                height=args.height,
                width=args.width,
                generator=[torch.Generator(device="cpu").manual_seed(seed) for seed in seeds],
                **_call_arguments(args),
            ).images
        for seed, image in zip(seeds, images, strict=True):
            path = os.path.join(args.output_dir, f"{prompt_index:03d}_{_slug(prompt)}_seed{seed}.png")
            image.save(path)
            print(path)


def run_activations(args):
    pipeline = _load_pipeline(args, [args.lora] if args.lora else [])
    results = pipeline.token_activations(
        args.prompt,
        num_inference_steps=args.num_inference_steps,
        resolution=args.resolution,
        seed=args.seed,
        attention_layers=args.attention_layers,
        **_call_arguments(args),
    )
    output_dir = os.path.dirname(args.output)
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
    save_token_activation_plot(results, args.output)
    first = next(iter(results.values()))
    summary = {
        "prompt": args.prompt,
        "tokens": first.prompt_tokens,
        "activations": {name: result.prompt_activations.tolist() for name, result in results.items()},
    }
    json_path = os.path.splitext(args.output)[0] + ".json"
    with open(json_path, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)

    print("token".ljust(16) + "".join(VARIANT_LABELS.get(name, name).rjust(10) for name in results))
    for index, token in enumerate(first.prompt_tokens):
        values = "".join(f"{result.prompt_activations[index].item():10.4f}" for result in results.values())
        print(token.ljust(16) + values)
    print(args.output)
    print(json_path)


def _model_names(loras):
    """Column names of the LoRAs: each folder's or repo's last part, numbered where two would be the same."""
    names = {}
    for lora in loras:
        name = os.path.basename(os.path.normpath(lora)) or lora
        unique, number = name, 2
        while unique in names or unique == "base":
            unique, number = f"{name}-{number}", number + 1
        names[unique] = lora
    return names


def run_evaluate(args):
    """Render every prompt set with the base model and each LoRA (same seeds), score, summarize, write the reports.

    Everything that can be refused is checked before the first image: the prompt sets, the base model, each LoRA
    (loaded once into the pipeline) and every scorer model the prompt sets need."""
    evaluation = importlib.import_module("utils.evaluation")
    eval_prompts = importlib.import_module("utils.eval_prompts")
    scorers_module = importlib.import_module("utils.scorers")

    try:
        prompt_sets = {}
        for spec in args.prompts:
            prompt_sets.update(eval_prompts.load_eval_prompts(spec, "--prompts", args.max_prompts))
    except ValueError as error:
        _fail(str(error))
    needed = dict.fromkeys(name for category in prompt_sets for name in scorers_module.scorers_for(eval_prompts.category_of(category)))
    models = {"base": None, **_model_names(args.lora)}
    pipeline = _load_pipeline(args, args.lora, keep_loras=False)
    device, dtype = _device_and_dtype(args)
    try:
        scorers = scorers_module.load_scorers(
            needed, blip_vqa_model=args.blip_vqa_model, grounding_model=args.grounding_model, clip_model=args.clip_model,
            spacy_model=args.spacy_model, device=device, box_threshold=args.box_threshold, text_threshold=args.text_threshold,
        )
    except (OSError, ValueError) as error:
        _fail(str(error))

    os.makedirs(args.output_dir, exist_ok=True)
    seeds = [args.seed + index for index in range(args.images_per_prompt)]
    size = {"height": args.resolution, "width": args.resolution} if args.resolution else {}
    call = dict(num_inference_steps=args.num_inference_steps, **size, **_call_arguments(args))
    results = {
        "base_model": args.base_model, "loras": {name: lora for name, lora in models.items() if lora},
        "settings": {"images_per_prompt": args.images_per_prompt, "seeds": seeds, **call, "dtype": str(dtype).split(".")[-1],
                     "blip_vqa_model": args.blip_vqa_model, "grounding_model": args.grounding_model, "clip_model": args.clip_model},
        "categories": {},
    }
    markdown = [f"# Alignment of {args.base_model}: base vs {', '.join(models) if len(models) > 1 else 'base only'}\n"]
    with open(os.path.join(args.output_dir, "scores.jsonl"), "w", encoding="utf-8") as scores_file:
        for category, prompts in prompt_sets.items():
            generations = evaluation.generate(pipeline, models, prompts, seeds, batch_size=args.batch_size, **call)
            lead = scorers_module.score_category(generations, eval_prompts.category_of(category), scorers)
            summary = evaluation.summarize(generations, baseline="base")
            metrics = sorted(summary["base"], key=lambda metric: metric != lead)  # the lead metric first
            grid = _save_grid(generations, metrics[:1], len(seeds), args.grid_prompts, os.path.join(args.output_dir, f"grid_{_slug(category)}.png"))
            results["categories"][category] = {"lead_metric": lead, "num_prompts": len(prompts), "grid": grid, "summary": summary}
            table = evaluation.markdown_table(summary, "base", metrics)
            markdown += [f"## {category} ({len(prompts)} prompts × {len(seeds)} seeds)\n", table, f"![{category}]({grid})\n"]
            print(f"\n{category}: {len(prompts)} prompts × {len(seeds)} seeds" + (f", lead metric {lead}" if lead else ""))
            print(table.replace("<br>", "  "))
            _write_scores(scores_file, category, generations)
    with open(os.path.join(args.output_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(args.output_dir, "results.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(markdown))
    print(os.path.join(args.output_dir, "results.md"))


def _save_grid(generations, shown_metric, num_seeds, num_prompts, path):
    """The first seed of the first ``num_prompts`` prompts, every model side by side (cells of about 192 px), each
    image captioned with ``shown_metric`` (a list of at most one name); returns the file name."""
    first_seeds = list(range(0, len(generations["base"].images), num_seeds))[:num_prompts]

    def caption(name, index):
        return f"{shown_metric[0]} {generations[name].scores[index].get(shown_metric[0], math.nan):.3f}"

    side = generations["base"].images[0].shape[0]
    importlib.import_module("utils.evaluation").side_by_side(generations, first_seeds, path, scale=min(4.0, 192 / side), caption=caption if shown_metric else None)
    return os.path.basename(path)


def _write_scores(scores_file, category, generations):
    """One JSON line per image: its category, model, prompt, seed and scores (null where a metric does not apply)."""
    for name, generation in generations.items():
        for prompt, seed, image_scores in zip(generation.prompts, generation.seeds, generation.scores):
            finite = {metric: value if math.isfinite(value) else None for metric, value in image_scores.items()}
            scores_file.write(json.dumps({"category": category, "model": name, "prompt": prompt, "seed": seed, **finite}) + "\n")


def run_push(args):
    repo_id = push_lora_to_hub(
        args.lora_dir,
        args.repo_id,
        base_model=args.base_model,
        sample_images=args.sample_images or (),
        sample_prompt=args.sample_prompt,
        private=args.private,
        commit_message=args.commit_message,
    )
    print(f"Uploaded {args.lora_dir} to {huggingface_hub.constants.ENDPOINT}/{repo_id}")


def main(argv=None):
    args = parse_args(argv)
    {"generate": run_generate, "activations": run_activations, "evaluate": run_evaluate, "push": run_push}[args.command](args)


if __name__ == "__main__":
    main()
