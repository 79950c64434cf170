"""pipeline_comat.py: community-pipeline loading for both families, token activations, Hub push and the CLI.

Everything runs on the tiny random models with real diffusers, peft and huggingface_hub code. The Hub is the
only thing replaced: by :class:`HubStandIn`, a local HTTP server implementing the endpoints that
``create_repo`` and ``upload_folder`` call.
"""

import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from huggingface_hub import ModelCard
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load, load_file

import pipeline_comat
from conftest import REPO_ROOT, script_env
from hub_stand_in import HubStandIn
from utils.attention_capture import install_attention_capture, remove_attention_capture
from utils.hub import LORA_WEIGHTS_NAME, push_folder_to_hub, push_lora_to_hub, read_model_card_inputs, save_model_card
from utils.training import lora_config, lora_metadata, unet_lora_state_dict

PIPELINE_FILE = os.path.join(REPO_ROOT, "pipeline_comat.py")
STOCK_CLASSES = {"sd": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}
PROMPT = "a red book and a yellow vase"
PROMPT_TOKENS = ["a", "red", "book", "and", "a", "yellow", "vase"]
GENERATION = {"num_inference_steps": 2, "height": 32, "width": 32}
TOKEN = "hf_comatTestToken0123456789abcdef"



@pytest.fixture(scope="module")
def tiny_paths(tiny_sd_path, tiny_sdxl_path):
    # Only the two bases: conftest's tiny_paths also builds the captioner and detectors, unused here.
    return {"sd": tiny_sd_path, "sdxl": tiny_sdxl_path}


@pytest.fixture(scope="module")
def lora_dirs(tiny_paths, tmp_path_factory):
    """A LoRA folder per family, written the way the training scripts write theirs, with random weights."""
    dirs = {}
    for family, pipeline_class in STOCK_CLASSES.items():
        unet = UNet2DConditionModel.from_pretrained(tiny_paths[family], subfolder="unet")
        unet.add_adapter(lora_config(rank=4))
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, parameter in unet.named_parameters():
                # peft's gaussian init leaves lora_B at zero (a no-op LoRA); make both factors non-zero.
                if "lora_" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
        directory = str(tmp_path_factory.mktemp("lora") / family)
        pipeline_class.save_lora_weights(
            directory, unet_lora_layers=unet_lora_state_dict(unet), unet_lora_adapter_metadata=lora_metadata(unet)
        )
        dirs[family] = directory
    return dirs


def load_custom(path):
    pipe = DiffusionPipeline.from_pretrained(path, custom_pipeline=PIPELINE_FILE, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def comat_pipes(tiny_paths, lora_dirs):
    """Per family: the custom pipeline with the family's LoRA loaded."""
    pipes = {}
    for family in STOCK_CLASSES:
        pipe = load_custom(tiny_paths[family])
        pipe.load_lora_weights(lora_dirs[family])
        pipes[family] = pipe
    return pipes


def generate(pipe, output_type="np"):
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type=output_type, **GENERATION).images


def lora_disabled_flags(pipe):
    return {module.disable_adapters for module in pipe.unet.modules() if isinstance(module, BaseTunerLayer)}


def imported_module(pipe):
    """The module diffusers imported the pipeline from (a copy of pipeline_comat.py in its modules cache)."""
    return sys.modules[type(pipe).__module__]


# ---------------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_custom_pipeline_is_the_family_pipeline_and_matches_stock_with_the_lora(family, tiny_paths, lora_dirs):
    stock_class = STOCK_CLASSES[family]
    pipe = load_custom(tiny_paths[family])
    assert type(pipe).__name__ == f"CoMat{stock_class.__name__}"
    assert isinstance(pipe, stock_class) and callable(pipe.token_activations)
    # The stock machinery holds: components match the family's signature, so e.g. pipe.to() works.
    assert set(pipe.components) == set(stock_class(**pipe.components).components)

    stock = stock_class.from_pretrained(tiny_paths[family])
    stock.set_progress_bar_config(disable=True)
    without_lora = generate(stock)
    stock.load_lora_weights(lora_dirs[family])
    pipe.load_lora_weights(lora_dirs[family])
    with_lora = generate(stock)

    assert np.array_equal(generate(pipe), with_lora)
    assert np.abs(with_lora - without_lora).max() > 1e-3, "the test LoRA must change the images"


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_lora_start_leaves_the_first_part_of_the_schedule_to_the_base_model(family, comat_pipes):
    pipe = comat_pipes[family]
    with_lora = generate(pipe)
    pipe.disable_lora()
    base = generate(pipe)
    pipe.enable_lora()
    with pipe.lora_start(0.0):
        assert np.array_equal(generate(pipe), with_lora)
    with pipe.lora_start(1.0):
        assert np.array_equal(generate(pipe), base)
    with pipe.lora_start(0.5):  # two steps: the base model draws the first, the LoRA the second
        halfway = generate(pipe)
    assert not np.array_equal(halfway, base) and not np.array_equal(halfway, with_lora)
    assert lora_disabled_flags(pipe) == {False}  # the LoRA is on again after the block
    pipe.disable_lora()
    with pipe.lora_start(0.5):
        pass
    assert lora_disabled_flags(pipe) == {True}  # and stays off when it was off
    pipe.enable_lora()
    with pytest.raises(ValueError, match="lora_start must be between 0"):
        with pipe.lora_start(1.5):
            pass


def test_pipeline_class_dispatches_direct_construction_and_from_pipe(tiny_paths):
    sd = StableDiffusionPipeline.from_pretrained(tiny_paths["sd"])
    sdxl = StableDiffusionXLPipeline.from_pretrained(tiny_paths["sdxl"])

    assert type(pipeline_comat.CoMatPipeline(**sd.components)).__name__ == "CoMatStableDiffusionPipeline"
    assert type(pipeline_comat.CoMatPipeline.from_pipe(sdxl)).__name__ == "CoMatStableDiffusionXLPipeline"
    loaded = pipeline_comat.CoMatPipeline.from_pretrained(tiny_paths["sdxl"])
    assert isinstance(loaded, StableDiffusionXLPipeline)
    assert type(pipeline_comat.CoMatPipeline(**sd.components)) is pipeline_comat.comat_pipeline_class(sd.__class__)
    with pytest.raises(TypeError, match="StableDiffusionXLPipeline takes no safety_checker"):
        pipeline_comat.CoMatPipeline(**sdxl.components, safety_checker=sd.vae)


# ---------------------------------------------------------------------------------------------------- token activations


def test_capture_records_without_grad_only_when_asked(tiny_paths):
    unet = UNet2DConditionModel.from_pretrained(tiny_paths["sd"], subfolder="unet")
    inputs = (torch.randn(2, 4, 8, 8), torch.tensor([10, 10]), torch.randn(2, 77, 32))
    for record_without_grad, expected_steps in [(False, 0), (True, 1)]:
        store = install_attention_capture(unet, "mid,up", 16, 2, record_without_grad=record_without_grad)
        with torch.no_grad(), store.capturing():
            unet(*inputs)
        assert len(store.step_maps) == expected_steps
        remove_attention_capture(unet, store)


@pytest.fixture(scope="module")
def sd_activations(comat_pipes):
    return comat_pipes["sd"].token_activations(PROMPT, num_inference_steps=2, resolution=32, seed=0)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_token_activations_are_per_pixel_distributions_of_every_step_with_and_without_lora(
    family, comat_pipes, monkeypatch
):
    pipe = comat_pipes[family]
    # Spy on the store class the pipeline uses: diffusers imported it with a copy of utils/attention_capture.py.
    store_class = imported_module(pipe).install_attention_capture.__globals__["AttentionStore"]
    recorded = []
    record = store_class.record

    def spy(store, layer, probs):
        recorded.append(probs)
        record(store, layer, probs)

    monkeypatch.setattr(store_class, "record", spy)

    results = pipe.token_activations(PROMPT, num_inference_steps=2, resolution=32, seed=0)

    assert list(results) == ["base", "comat"]
    assert [result.lora_enabled for result in results.values()] == [False, True]
    num_layers = len([name for name, module in pipe.unet.named_modules() if name.endswith("attn2")])
    # Every cross-attention layer at both steps of both generations, conditional half only, under no_grad.
    assert len(recorded) == 2 * 2 * num_layers
    for probs in recorded:
        assert probs.shape[0] == 1 and probs.shape[-1] == 77 and not probs.requires_grad
        torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)))

    heatmap_side = 16 if family == "sd" else 8  # the largest cross-attention map of the tiny UNets at 32 px
    for result in results.values():
        assert result.prompt_tokens == PROMPT_TOKENS and result.prompt_positions == list(range(1, 8))
        assert result.activations.shape == (77,) and result.heatmaps.shape == (77, heatmap_side, heatmap_side)
        assert result.prompt_activations.shape == (7,)
        assert result.prompt_heatmaps.shape == (7, heatmap_side, heatmap_side)
        torch.testing.assert_close(result.activations.sum(), torch.tensor(1.0))
        torch.testing.assert_close(result.heatmaps.sum(0), torch.ones(heatmap_side, heatmap_side))
        assert result.image.size == (32, 32)
    assert (results["comat"].activations - results["base"].activations).abs().max() > 1e-4
    assert (results["comat"].heatmaps - results["base"].heatmaps).abs().max() > 1e-4


def test_token_activations_leave_the_pipeline_as_they_found_it(comat_pipes, sd_activations):
    pipe = comat_pipes["sd"]
    processors_before = {key: type(processor) for key, processor in pipe.unet.attn_processors.items()}
    # Capturing does not perturb generation: the images are those of ordinary calls with the same seed.
    assert np.array_equal(np.asarray(sd_activations["comat"].image), np.asarray(generate(pipe, "pil")[0]))
    pipe.disable_lora()
    try:
        assert np.array_equal(np.asarray(sd_activations["base"].image), np.asarray(generate(pipe, "pil")[0]))
        pipe.token_activations(PROMPT, num_inference_steps=1, resolution=32)
        assert lora_disabled_flags(pipe) == {True}, "a disabled LoRA stays disabled"
    finally:
        pipe.enable_lora()
    assert lora_disabled_flags(pipe) == {False}
    assert {key: type(processor) for key, processor in pipe.unet.attn_processors.items()} == processors_before


def test_token_activations_without_lora_only_measure_the_base(tiny_paths):
    pipe = pipeline_comat.CoMatPipeline.from_pretrained(tiny_paths["sd"])
    pipe.set_progress_bar_config(disable=True)
    results = pipe.token_activations(PROMPT, num_inference_steps=1, resolution=32, attention_layers="up")
    assert list(results) == ["base"]


def test_token_activation_plot_is_a_png(sd_activations, tmp_path):
    path = pipeline_comat.save_token_activation_plot(sd_activations, str(tmp_path / "activations.png"))
    with PIL.Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width >= 600 and image.height >= 400
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.std() > 10, "the plot has content"


# ---------------------------------------------------------------------------------------------------- Hub push


@pytest.fixture
def hub():
    with HubStandIn() as stand_in:
        yield stand_in


@pytest.fixture
def hub_configured(hub, monkeypatch, tmp_path):
    """huggingface_hub in this process pointed at the stand-in, as HF_ENDPOINT does at import time."""
    import huggingface_hub.constants

    # conftest puts huggingface_hub offline; only the local stand-in is reached here.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(huggingface_hub.constants, "AGENT_HARNESSES_PATH", str(tmp_path / "agent_harnesses.json"))
    return hub


def training_output(tmp_path, lora_dir, base_model):
    """A folder as train_comat.py leaves it: LoRA, card, validation image, plus resume-only state."""
    folder = tmp_path / "comat-out"
    (folder / "validation").mkdir(parents=True)
    (folder / "checkpoint-2").mkdir()
    (folder / "checkpoint-2" / "optimizer.safetensors").write_bytes(b"resume state")
    (folder / "logs").mkdir()
    (folder / "logs" / "events").write_bytes(b"tensorboard")
    shutil.copy(os.path.join(lora_dir, LORA_WEIGHTS_NAME), folder)
    image_path = folder / "validation" / "step_000004_0.png"
    PIL.Image.new("RGB", (32, 32), (200, 30, 30)).save(image_path)
    settings = {"pretrained_model_name_or_path": base_model, "rank": 4, "learning_rate": 5e-05}
    save_model_card(str(folder), base_model, "StableDiffusionPipeline", settings, PROMPT, [str(image_path)])
    return folder


def test_push_uploads_lora_card_and_samples_intact_and_never_the_token(
    hub_configured, tmp_path, lora_dirs, caplog, capsys, monkeypatch
):
    hub = hub_configured
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    folder = training_output(tmp_path, lora_dirs["sd"], "tiny/sd-base")
    caplog.set_level(logging.DEBUG)
    for name in ("huggingface_hub", "httpx2", "httpcore2", "utils.hub"):
        caplog.set_level(logging.DEBUG, logger=name)

    repo_id = push_lora_to_hub(str(folder), "someone/comat-test", private=True)

    assert repo_id == "someone/comat-test"
    assert hub.created == [{"name": "comat-test", "organization": "someone", "visibility": "private"}]
    assert hub.authorizations == {f"Bearer {TOKEN}"} and not hub.unexpected
    assert hub.validated == [{"content": hub.files["README.md"].decode(), "repoType": "model"}]
    assert hub.commits == [{"summary": "Upload CoMat LoRA", "description": ""}]
    expected = {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in folder.rglob("*")
        if path.is_file() and not path.relative_to(folder).as_posix().startswith(("checkpoint-", "logs/"))
    }
    assert set(expected) == {LORA_WEIGHTS_NAME, "README.md", "comat_model_card.json", "validation/step_000004_0.png"}
    assert hub.files == expected
    uploaded_lora = load(hub.files[LORA_WEIGHTS_NAME])
    for key, tensor in load_file(os.path.join(lora_dirs["sd"], LORA_WEIGHTS_NAME)).items():
        assert torch.equal(uploaded_lora[key], tensor)
    card = ModelCard(hub.files["README.md"].decode())
    assert card.data.base_model == "tiny/sd-base"
    assert {"lora", "comat", "text-to-image"} <= set(card.data.tags)
    assert f'pipe.load_lora_weights("{repo_id}")' in card.text, "the card is re-rendered for the repo"
    assert "| `rank` | `4` |" in card.text and "| `learning_rate` | `5e-05` |" in card.text
    assert "![sample](validation/step_000004_0.png)" in card.text
    assert card.data.widget[0]["output"]["url"] == "validation/step_000004_0.png"

    output = capsys.readouterr()
    assert any("someone/comat-test" in record.getMessage() for record in caplog.records)
    for text in [*(record.getMessage() for record in caplog.records), output.out, output.err]:
        assert TOKEN not in text
    for content in hub.files.values():
        assert TOKEN.encode() not in content


def test_push_folder_to_hub_keeps_the_training_loop_signature(hub_configured, tmp_path, lora_dirs, monkeypatch):
    hub = hub_configured
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    folder = training_output(tmp_path, lora_dirs["sd"], "tiny/sd-base")
    assert push_folder_to_hub(str(folder), "someone/run", private=False) == "someone/run"
    assert hub.created[0]["visibility"] == "public"
    assert LORA_WEIGHTS_NAME in hub.files and not any(path.startswith("checkpoint-") for path in hub.files)


def test_push_reads_the_base_model_from_an_older_card_or_asks_for_it(tmp_path, lora_dirs):
    folder = tmp_path / "bare"
    folder.mkdir()
    shutil.copy(os.path.join(lora_dirs["sd"], LORA_WEIGHTS_NAME), folder)
    with pytest.raises(ValueError, match="--base_model"):
        push_lora_to_hub(str(folder), "someone/bare")
    # A card from before comat_model_card.json existed still names the base model in its metadata.
    ModelCard("---\nbase_model: tiny/older-base\ntags:\n- comat\n---\n\n# Older card\n").save(folder / "README.md")
    assert read_model_card_inputs(str(folder)) == {"base_model": "tiny/older-base"}


# ---------------------------------------------------------------------------------------------------- command line


def test_cli_generate_and_activations_write_images(tiny_paths, lora_dirs, tmp_path, capsys):
    common = ["--base_model", tiny_paths["sd"], "--lora", lora_dirs["sd"], "--num_inference_steps", "2"]
    common += ["--device", "cpu"]
    pipeline_comat.main(
        ["generate", *common, "--prompt", PROMPT, "--prompt", "a blue cat", "--num_images_per_prompt", "2"]
        + ["--height", "32", "--width", "32", "--output_dir", str(tmp_path / "images")]
    )
    printed = capsys.readouterr().out.split()
    assert sorted(os.listdir(tmp_path / "images")) == sorted(os.path.basename(path) for path in printed)
    assert len(printed) == 4
    for path in printed:
        with PIL.Image.open(path) as image:
            assert image.size == (32, 32)

    plot = tmp_path / "diagnostics" / "activations.png"
    pipeline_comat.main(["activations", *common, "--prompt", PROMPT, "--resolution", "32", "--output", str(plot)])
    summary = json.loads((tmp_path / "diagnostics" / "activations.json").read_text())
    assert summary["tokens"] == PROMPT_TOKENS and set(summary["activations"]) == {"base", "comat"}
    with PIL.Image.open(plot) as image:
        assert image.format == "PNG"
    assert "vase" in capsys.readouterr().out


@pytest.mark.parametrize("flags,named", [
    (["--lora_start", "1.5", "--lora", "some-lora"], "--lora_start 1.5 must be between 0"),
    (["--lora_start", "0.1"], "--lora_start says when the LoRA takes over: give --lora too"),
])
def test_cli_generate_refuses_a_bad_lora_start(flags, named, capsys):
    with pytest.raises(SystemExit):
        pipeline_comat.parse_args(["generate", "--base_model", "some-model", "--prompt", PROMPT, *flags])
    assert named in capsys.readouterr().err


def test_cli_push_takes_the_token_from_hf_token_and_hides_it(hub, tmp_path, lora_dirs):
    folder = training_output(tmp_path, lora_dirs["sd"], "tiny/sd-base")
    sample = tmp_path / "elsewhere.png"
    PIL.Image.new("RGB", (16, 16), (0, 90, 200)).save(sample)
    env = script_env()
    env.update(HF_ENDPOINT=hub.url, HF_TOKEN=TOKEN, HF_HUB_OFFLINE="0", HF_DEBUG="1", HF_HOME=str(tmp_path / "hf_home"))
    # Launched from outside the project folder, as users launch it.
    result = subprocess.run(
        [sys.executable, PIPELINE_FILE, "push", "--lora_dir", str(folder), "--repo_id", "someone/cli-test", "--private",
         "--sample_images", str(sample), "--sample_prompt", "a blue square"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout
    assert "Uploaded" in result.stdout and TOKEN not in result.stdout
    assert hub.authorizations == {f"Bearer {TOKEN}"}
    assert hub.created[0]["visibility"] == "private"
    assert hub.files["samples/elsewhere.png"] == sample.read_bytes()
    card = ModelCard(hub.files["README.md"].decode())
    assert 'pipe.load_lora_weights("someone/cli-test")' in card.text and "![sample](samples/elsewhere.png)" in card.text
    assert "Prompt: `a blue square`" in card.text
    assert all(TOKEN.encode() not in content for content in hub.files.values())


@pytest.mark.parametrize("with_card", [True, False], ids=["recorded-family", "weights-only"])
def test_cli_refuses_a_lora_of_the_other_family(tiny_paths, lora_dirs, tmp_path, capsys, with_card):
    lora = tmp_path / "sd-lora"
    shutil.copytree(lora_dirs["sd"], lora)
    if with_card:
        save_model_card(str(lora), "tiny/sd-base", "StableDiffusionPipeline", {}, None, [])
    with pytest.raises(SystemExit) as exit_info:
        pipeline_comat.main(["generate", "--base_model", tiny_paths["sdxl"], "--lora", str(lora), "--prompt", PROMPT, "--device", "cpu"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and f"--lora {lora}" in err and "Traceback" not in err
    if with_card:
        assert "trained for a StableDiffusionPipeline base, but --base_model is an SDXL model" in err


def test_cli_refuses_a_pickled_lora_a_token_on_the_command_line_and_missing_paths(tiny_paths, tmp_path, capsys):
    pickled = tmp_path / "pickled-lora"
    pickled.mkdir()
    (pickled / "pytorch_lora_weights.bin").write_bytes(b"not to be unpickled")
    with pytest.raises(SystemExit) as exit_info:
        pipeline_comat.main(["generate", "--base_model", tiny_paths["sd"], "--lora", str(pickled), "--prompt", PROMPT, "--device", "cpu"])
    assert exit_info.value.code == 2
    assert "refuses to unpickle" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        pipeline_comat.main(["generate", "--base_model", tiny_paths["sd"], "--lora", "./comat-sd15-typo", "--prompt", PROMPT])
    assert exit_info.value.code == 2 and "--lora ./comat-sd15-typo: no such folder." in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        pipeline_comat.main(["generate", "--base_model", str(tmp_path / "no-base"), "--prompt", PROMPT])
    assert exit_info.value.code == 2 and f"--base_model {tmp_path / 'no-base'}: no such folder." in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        pipeline_comat.main(["push", "--lora_dir", str(pickled), "--repo_id", "someone/x", "--token", TOKEN])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "hf auth login" in err and TOKEN not in err


@pytest.fixture(scope="module")
def scorer_flags(tiny_blip_vqa_path, tiny_grounding_dino_path, tiny_clip_path):
    return ["--blip_vqa_model", tiny_blip_vqa_path, "--grounding_model", tiny_grounding_dino_path, "--clip_model", tiny_clip_path,
            "--box_threshold", "0", "--text_threshold", "0"]


def test_cli_evaluate_compares_base_and_loras_per_category(tiny_paths, lora_dirs, scorer_flags, tmp_path, capsys):
    user_file = tmp_path / "complex_val.txt"  # a T2I-CompBench file: scored as its category
    user_file.write_text("three black cats on the left of a red sofa\na chef in a red hat riding a white horse\n")
    second = tmp_path / "second"
    shutil.copytree(lora_dirs["sd"], second)
    output_dir = tmp_path / "eval"
    pipeline_comat.main(
        ["evaluate", "--base_model", tiny_paths["sd"], "--lora", lora_dirs["sd"], "--lora", str(second), "--device", "cpu"]
        + ["--prompts", "builtin:color,spatial", "--prompts", str(user_file), "--max_prompts", "2", "--images_per_prompt", "2"]
        + ["--num_inference_steps", "2", "--resolution", "32", "--output_dir", str(output_dir), *scorer_flags]
    )
    results = json.loads((output_dir / "results.json").read_text())
    assert results["loras"] == {"sd": lora_dirs["sd"], "second": str(second)}
    categories = results["categories"]
    assert {name: entry["lead_metric"] for name, entry in categories.items()} == {"color": "blip_vqa", "spatial": "spatial", "complex_val": "three_in_one"}
    for entry in categories.values():
        assert list(entry["summary"]) == ["base", "sd", "second"]
        lead = entry["summary"]["sd"][entry["lead_metric"]]
        assert lead["n"] == 4 and "difference_to_base" in lead
        # the same LoRA twice: the same images, the same scores
        assert entry["summary"]["second"][entry["lead_metric"]]["mean"] == lead["mean"]
        with PIL.Image.open(output_dir / entry["grid"]) as grid:
            assert grid.format == "PNG"
    assert {"blip_vqa", "spatial", "clip_score", "objects_present", "counting"} <= set(categories["complex_val"]["summary"]["base"])
    lines = [json.loads(line) for line in (output_dir / "scores.jsonl").read_text().splitlines()]
    assert len(lines) == 3 * 2 * 2 * 3  # categories × prompts × seeds × models
    assert {line["seed"] for line in lines} == {0, 1}
    markdown = (output_dir / "results.md").read_text()
    assert "## color (2 prompts × 2 seeds)" in markdown and "| model | blip_vqa |" in markdown
    printed = capsys.readouterr().out
    assert "spatial: 2 prompts × 2 seeds, lead metric spatial" in printed and "Δ" in printed

    # an SDXL base with its LoRA
    pipeline_comat.main(
        ["evaluate", "--base_model", tiny_paths["sdxl"], "--lora", lora_dirs["sdxl"], "--device", "cpu", "--prompts", "builtin:color"]
        + ["--max_prompts", "1", "--images_per_prompt", "1", "--num_inference_steps", "2", "--resolution", "32"]
        + ["--output_dir", str(tmp_path / "eval-xl"), *scorer_flags]
    )
    summary = json.loads((tmp_path / "eval-xl" / "results.json").read_text())["categories"]["color"]["summary"]
    assert list(summary) == ["base", "sdxl"] and summary["sdxl"]["blip_vqa"]["n"] == 1


def test_cli_evaluate_refuses_bad_input_before_generating(tiny_paths, scorer_flags, tmp_path, capsys):
    output_dir = tmp_path / "eval"
    base = ["evaluate", "--base_model", tiny_paths["sd"], "--device", "cpu", "--output_dir", str(output_dir)]
    cases = [
        (["--prompts", "builtin:colour", *scorer_flags], "--prompts builtin:colour: no built-in category 'colour'"),
        (["--prompts", "builtin:color", "--images_per_prompt", "0"], "--images_per_prompt must be at least 1"),
        (["--prompts", "builtin:non_spatial", *scorer_flags[:4], "--clip_model", str(tmp_path / "no-clip")], "given by --clip_model"),
        (["--prompts", "builtin:color", "--lora", str(tmp_path / "no-lora")], "no such folder"),
    ]
    for flags, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            pipeline_comat.main(base + flags)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and message in err and "Traceback" not in err
    assert not output_dir.exists()


def test_expected_library_warnings_are_hidden_and_the_others_print_once(tiny_paths, lora_dirs):
    """What a person reads: no torchvision-fallback or "No LoRA keys … CLIPTextModel" warnings (expected, harmless),
    and a Hub warning (e.g. an upload retry) once, not twice."""
    code = f"""
import utils
from accelerate import Accelerator
from diffusers import StableDiffusionPipeline
from utils.training import configure_logging
configure_logging(Accelerator(cpu=True))
import logging
logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
pipe = StableDiffusionPipeline.from_pretrained({tiny_paths["sd"]!r}, safety_checker=None)
pipe.load_lora_weights({lora_dirs["sd"]!r})
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(PIPELINE_FILE), env=script_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    assert result.returncode == 0, result.stdout
    assert result.stdout.count("Retrying in 1s") == 1
    assert "torchvision" not in result.stdout and "No LoRA keys" not in result.stdout
