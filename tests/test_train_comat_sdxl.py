"""What is specific to train_comat_sdxl.py: SDXL conditioning, its discriminator, the image range, wrong-family errors."""

import types

import pytest
import torch

from conftest import run_script
from test_train_comat import tiny_args
from utils.concept_matching import CaptionScorer
from utils.grounded_segmentation import GroundedSegmenter
from utils.training import lora_config


@pytest.fixture(scope="module")
def sdxl_family(tiny_paths, tmp_path_factory):
    import train_comat_sdxl

    args = train_comat_sdxl.parse_args(tiny_args(tiny_paths, str(tmp_path_factory.mktemp("sdxl")), base="sdxl"))
    family = train_comat_sdxl.StableDiffusionXLFamily()
    family.load(args, torch.float32)
    family.unet.add_adapter(lora_config(4))
    return args, family


def test_sdxl_conditioning_matches_the_stock_pipeline(sdxl_family, tiny_paths):
    from diffusers import StableDiffusionXLPipeline

    args, family = sdxl_family
    kwargs = family.unet_kwargs(["a red book", "a blue cup"])
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_paths["sdxl"])
    prompt_embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
        ["a red book", "a blue cup"], device="cpu", do_classifier_free_guidance=True
    )
    torch.testing.assert_close(kwargs["encoder_hidden_states"], torch.cat([negative_embeds, prompt_embeds]))
    torch.testing.assert_close(kwargs["added_cond_kwargs"]["text_embeds"], torch.cat([negative_pooled, pooled]))
    size = args.resolution
    assert kwargs["added_cond_kwargs"]["time_ids"].tolist() == [[size, size, 0, 0, size, size]] * 4


def test_discriminator_is_built_from_the_sdxl_unet(sdxl_family):
    from utils.training_loop import FidelityPreservation

    args, family = sdxl_family
    fidelity = FidelityPreservation(args, family, types.SimpleNamespace(device=torch.device("cpu")))
    assert fidelity.discriminator.unet is family.unet
    assert family.unet.config.addition_embed_type == "text_time"  # an SDXL UNet, needs time ids + pooled
    logits = fidelity.logits(torch.randn(2, 4, 8, 8), torch.tensor(1))
    assert logits.shape == (2, 1, 8, 8)


def test_images_outside_unit_range_are_refused_by_captioner_and_segmenter(tiny_paths):
    """The reference code handed [-1, 1] images to both on the SDXL path; here it cannot happen silently."""
    scorer = CaptionScorer.from_pretrained(tiny_paths["blip"])
    segmenter = GroundedSegmenter.from_pretrained(tiny_paths["grounding_dino"], tiny_paths["sam"])
    signed = torch.rand(1, 3, 64, 64) * 2 - 1
    with pytest.raises(ValueError, match=r"captioner expects images in \[0, 1\]"):
        scorer.loss(signed, ["a red book"])
    with pytest.raises(ValueError, match=r"Grounded-SAM expects images in \[0, 1\]"):
        segmenter(signed, [["book"]])
    scorer.loss(signed.clamp(0, 1), ["a red book"])
    segmenter(signed.clamp(0, 1), [["book"]])


def test_sd_checkpoint_points_to_train_comat(tiny_paths, tmp_path):
    result = run_script("python", "train_comat_sdxl.py", tiny_args(tiny_paths, str(tmp_path / "out"), base="sd"), check=False)
    assert result.returncode == 2
    assert "train_comat.py" in result.stdout and "Traceback" not in result.stdout
