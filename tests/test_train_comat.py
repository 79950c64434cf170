"""train_comat.py and train_comat_sdxl.py end to end: launched as users launch them, on tiny models, offline.

The two scripts share the training loop, so loop behaviour (non-finite losses here; preemption and resume in
test_resume_and_preemption.py) is tested on SD only; what each family does differently (loading, conditioning,
LoRA format) is tested on both.
"""

import json
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_script

SCRIPT = "train_comat.py"
SCRIPTS = {"sd": "train_comat.py", "sdxl": "train_comat_sdxl.py"}


def pipeline_class(family):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionPipeline if family == "sd" else StableDiffusionXLPipeline


def tiny_args(paths, output_dir, base="sd", **overrides):
    """Flags for a run on the tiny models with all three modules on (a few seconds a step on CPU)."""
    args = {
        "pretrained_model_name_or_path": paths[base],
        "caption_model_name_or_path": paths["blip"],
        "grounding_model_name_or_path": paths["grounding_dino"],
        "sam_model_name_or_path": paths["sam"],
        # The tiny UNets have two resolution levels, not SD's four: use every mid/up cross-attention layer.
        "attention_layers": "mid,up",
        # Random detectors score low: keep every box so that masks are not all empty.
        "box_threshold": 0.0,
        "text_threshold": 0.0,
        "output_dir": output_dir,
        "resolution": 32,  # 16×16 latents: every path runs, at a quarter of the cost of 64 px
        "train_batch_size": 2,
        "num_inference_steps": 4,
        "num_grad_steps": 2,
        "max_train_steps": 4,
        "rank": 4,
        "learning_rate": 1e-3,
        "report_to": "none",
        "seed": 3,
    }
    args.update(overrides)
    flat = []
    for key, value in args.items():
        if value is True:
            flat.append(f"--{key}")
        elif value is not None and value is not False:
            flat += [f"--{key}", str(value)]
    return flat


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def trained_run(request, tiny_paths, tmp_path_factory):
    """One accelerate-launched run per family with all three modules, a checkpoint at step 2 of 4 and an alignment
    evaluation (two built-in colour prompts, BLIP-VQA) before the first step and at the last."""
    family = request.param
    output_dir = str(tmp_path_factory.mktemp("run") / "out")
    result = run_script("accelerate", SCRIPTS[family], tiny_args(
        tiny_paths, output_dir, base=family, checkpointing_steps=2, gradient_checkpointing=True,
        validation_prompt="a red book and a yellow vase", num_validation_images=1, validation_steps=100,
        report_to="tensorboard", eval_prompts="builtin:color", eval_steps=4, eval_num_prompts=2, blip_vqa_model=tiny_paths["blip_vqa"],
    ))
    return family, output_dir, result.stdout


def test_lora_loads_into_stock_pipeline_and_changes_its_output(trained_run, tiny_paths):
    family, output_dir, log = trained_run
    assert "modules: concept matching, attribute concentration, fidelity preservation" in log
    assert os.path.isfile(os.path.join(output_dir, "pytorch_lora_weights.safetensors"))
    pipe = pipeline_class(family).from_pretrained(tiny_paths[family])
    pipe.set_progress_bar_config(disable=True)

    def generate():
        return pipe("a red book", num_inference_steps=3, height=64, width=64, output_type="np",
                    generator=torch.Generator().manual_seed(0)).images

    base = generate()
    pipe.load_lora_weights(output_dir)
    with_lora = generate()
    assert base.shape == with_lora.shape == (1, 64, 64, 3)
    assert abs(base - with_lora).max() > 1e-4


def test_model_card_checkpoints_and_validation_images(trained_run):
    from huggingface_hub import ModelCard

    _, output_dir, _ = trained_run
    card = ModelCard.load(os.path.join(output_dir, "README.md"))
    assert "comat" in card.data.tags and "lora" in card.data.tags
    assert "load_lora_weights" in card.text
    assert os.listdir(os.path.join(output_dir, "validation"))
    # Step 4 is the last step: checkpointed too, so that the run can be extended.
    assert sorted(d for d in os.listdir(output_dir) if d.startswith("checkpoint")) == ["checkpoint-2", "checkpoint-4"]
    checkpoint = os.path.join(output_dir, "checkpoint-2")
    names = set(os.listdir(checkpoint))
    assert {"pytorch_lora_weights.safetensors", "optimizer.safetensors", "lr_scheduler.json", "training_state.json",
            "rng_state_0.safetensors", "discriminator.safetensors"} <= names
    assert not any(n.endswith((".bin", ".pkl", ".pt")) for n in names)
    assert json.load(open(os.path.join(checkpoint, "training_state.json")))["global_step"] == 2


def test_alignment_is_logged_from_the_base_model_to_the_last_step(trained_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, output_dir, stdout = trained_run
    accumulator = EventAccumulator(os.path.join(output_dir, "logs", "comat"))
    accumulator.Reload()
    curve = accumulator.Scalars("alignment/color/blip_vqa")
    assert [event.step for event in curve] == [0, 4]
    assert all(0 < event.value < 1 for event in curve)
    assert "Alignment at step 4: alignment/color/blip_vqa" in stdout


def test_resume_gives_the_same_lora_as_an_uninterrupted_run(trained_run, tiny_paths, tmp_path):
    """With the discriminator on: its LoRA, head and optimizer must come back exactly for this to hold."""
    family, output_dir, _ = trained_run
    resumed_dir = str(tmp_path / "resumed")
    os.makedirs(resumed_dir)
    shutil.copytree(os.path.join(output_dir, "checkpoint-2"), os.path.join(resumed_dir, "checkpoint-2"))
    result = run_script("python", SCRIPTS[family], tiny_args(
        tiny_paths, resumed_dir, base=family, checkpointing_steps=2, gradient_checkpointing=True,
        resume_from_checkpoint="latest", reference_latents_dir=os.path.join(output_dir, "reference_latents"),
    ))
    assert "Resumed from" in result.stdout
    uninterrupted = load_file(os.path.join(output_dir, "pytorch_lora_weights.safetensors"))
    resumed = load_file(os.path.join(resumed_dir, "pytorch_lora_weights.safetensors"))
    assert uninterrupted.keys() == resumed.keys()
    checkpointed = load_file(os.path.join(output_dir, "checkpoint-2", "pytorch_lora_weights.safetensors"))
    assert any(not torch.equal(checkpointed[k], uninterrupted[k]) for k in uninterrupted)  # steps 3-4 trained
    for key in uninterrupted:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("path", ["fp16, accumulation 2", "bf16, accumulation 2", "two processes"])
def test_the_latent_anchors_train_on_every_path_and_keep_the_processes_in_sync(path, tiny_paths, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    overrides = {
        "fp16, accumulation 2": dict(mixed_precision="fp16", gradient_accumulation_steps=2),
        "bf16, accumulation 2": dict(mixed_precision="bf16", gradient_accumulation_steps=2),
        "two processes": {},
    }[path]
    num_processes = 2 if path == "two processes" else 1
    output_dir = tmp_path / "out"
    result = run_script("torchrun" if num_processes == 2 else "python", SCRIPT, tiny_args(
        tiny_paths, str(output_dir), train_batch_size=1, max_train_steps=2, no_attribute_concentration=True,
        latent_moment_loss_weight=1.0, kl_loss_weight=1.0, report_to="tensorboard", **overrides,
    ), num_processes=num_processes)
    if num_processes == 2:
        assert "LoRA identical on 2 processes" in result.stdout
    accumulator = EventAccumulator(str(output_dir / "logs" / "comat"))
    accumulator.Reload()
    moments = [event.value for event in accumulator.Scalars("latent_moment_loss")]
    assert len(moments) == 2 and all(math.isfinite(value) and value > 0 for value in moments)
    kl = [event.value for event in accumulator.Scalars("kl_loss")]
    assert kl[0] == 0 and math.isfinite(kl[1]) and kl[1] > 0  # the LoRA starts as the base model, then leaves it
    assert all(math.isfinite(event.value) for event in accumulator.Scalars("discriminator_loss"))


@pytest.mark.parametrize("family", ["sdxl"])  # the loop is shared by both families; SD runs on two processes in test_resume_and_preemption.py
def test_two_processes_keep_identical_lora(family, tiny_paths, tmp_path):
    output_dir = str(tmp_path / "ddp")
    result = run_script("torchrun", SCRIPTS[family], tiny_args(
        tiny_paths, output_dir, base=family, max_train_steps=2,
        # the default layers run on two processes in test_resume_and_preemption.py and test_two_process_fp16.py
        lora_layers="attn2.to_k,attn2.to_v",
        # the main process evaluates alignment alone, before the first step and at the last, while the other waits
        eval_prompts="builtin:color", eval_steps=2, eval_num_prompts=1, blip_vqa_model=tiny_paths["blip_vqa"],
    ), num_processes=2)
    assert "2 processes" in result.stdout
    assert "LoRA identical on 2 processes" in result.stdout
    assert result.stdout.count("Alignment at step 0:") == result.stdout.count("Alignment at step 2:") == 1
    assert os.path.isfile(os.path.join(output_dir, "pytorch_lora_weights.safetensors"))


def test_lora_layers_put_the_lora_on_the_named_layers_only_and_a_resume_must_keep_them(tiny_paths, tmp_path):
    from diffusers import StableDiffusionPipeline

    output_dir = str(tmp_path / "kv")
    run_script("python", SCRIPT, tiny_args(tiny_paths, output_dir, lora_layers="attn2.to_k, attn2.to_v", max_train_steps=2,
                                           checkpointing_steps=1, no_attribute_concentration=True))
    keys = load_file(os.path.join(output_dir, "pytorch_lora_weights.safetensors")).keys()
    layers = {".".join(key.split(".lora.")[0].split(".")[-2:]) for key in keys}  # "….attn2.to_k.lora.down.weight"
    assert layers == {"attn2.to_k", "attn2.to_v"}
    pipe = StableDiffusionPipeline.from_pretrained(tiny_paths["sd"])
    pipe.set_progress_bar_config(disable=True)
    base = pipe("a red book", num_inference_steps=2, height=32, width=32, output_type="np", generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora_weights(output_dir)
    with_lora = pipe("a red book", num_inference_steps=2, height=32, width=32, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert abs(base - with_lora).max() > 1e-5

    refused = run_script("python", SCRIPT, tiny_args(
        tiny_paths, output_dir, max_train_steps=3, no_attribute_concentration=True, resume_from_checkpoint="latest"), check=False)
    assert refused.returncode == 2 and "Traceback" not in refused.stdout
    assert "--lora_layers: 'attn2.to_k,attn2.to_v' in the checkpoint, 'to_q,to_k,to_v,to_out.0' now" in refused.stdout


def test_checkpoints_from_before_lora_layers_resume_with_the_default_layers():
    from utils.training import check_resume_settings

    current = {"rank": 4, "lora_layers": "to_q,to_k,to_v,to_out.0"}
    check_resume_settings({"rank": 4}, current, "checkpoint-2")
    with pytest.raises(ValueError, match="--lora_layers: 'to_q,to_k,to_v,to_out.0' in the checkpoint, 'attn2.to_k' now"):
        check_resume_settings({"rank": 4}, {**current, "lora_layers": "attn2.to_k"}, "checkpoint-2")


def test_nonfinite_losses_skip_updates_then_abort_with_a_checkpoint(tiny_paths, tmp_path):
    output_dir = str(tmp_path / "nan")
    # A huge learning rate blows the LoRA up after the first update; every later loss is non-finite.
    result = run_script("python", SCRIPT, tiny_args(
        tiny_paths, output_dir, learning_rate=1e30, max_nonfinite_steps=2, max_train_steps=10,
        adam_weight_decay=0.0,
    ), check=False)
    assert result.returncode == 1 and "Traceback" not in result.stdout
    assert "non-finite loss, update skipped" in result.stdout
    assert "optimizer steps in a row had a non-finite loss" in result.stdout
    checkpoints = [d for d in os.listdir(output_dir) if d.startswith("checkpoint-")]
    assert checkpoints and os.path.isfile(os.path.join(output_dir, checkpoints[0], "training_state.json"))


def test_prompts_without_entities_and_images_without_detections_still_train(tiny_paths, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na photo of the sky\n")  # no attribute → no entity; "sky" is on the stop list
    output_dir = str(tmp_path / "out")
    run_script("python", SCRIPT, tiny_args(
        tiny_paths, output_dir, train_data=str(prompts), box_threshold=1.01, max_train_steps=1, report_to="tensorboard",
    ))
    events = os.path.join(output_dir, "logs", "comat")
    accumulator = EventAccumulator(events)
    accumulator.Reload()
    scalars = {tag: accumulator.Scalars(tag)[-1].value for tag in accumulator.Tags()["scalars"]}
    assert scalars["entities_per_prompt"] == 0 and scalars["token_loss"] == 0 and scalars["pixel_loss"] == 0
    assert scalars["caption_loss"] > 0 and scalars["discriminator_loss"] > 0


@pytest.mark.parametrize("path", ["fp32", "fp16, accumulation 2", "bf16, accumulation 2", "two processes"])
def test_nouns_the_segmenter_does_not_find_are_counted_and_still_trained(path, tiny_paths, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat and a blue dog\na green bird and a yellow car\n")
    output_dir = str(tmp_path / "out")
    overrides = {
        "fp32": {},
        "fp16, accumulation 2": dict(mixed_precision="fp16", gradient_accumulation_steps=2, train_batch_size=1),
        "bf16, accumulation 2": dict(mixed_precision="bf16", gradient_accumulation_steps=2, train_batch_size=1),
        "two processes": dict(train_batch_size=1),
    }[path]
    num_processes = 2 if path == "two processes" else 1
    # A box threshold above every score: the segmenter finds no noun.
    result = run_script("torchrun" if num_processes == 2 else "python", SCRIPT, tiny_args(
        tiny_paths, output_dir, train_data=str(prompts), box_threshold=1.01, max_train_steps=1, report_to="tensorboard",
        no_fidelity_preservation=True, **overrides,
    ), num_processes=num_processes)
    assert f"{num_processes} processes" in result.stdout
    accumulator = EventAccumulator(os.path.join(output_dir, "logs", "comat"))
    accumulator.Reload()
    scalars = {tag: accumulator.Scalars(tag)[-1].value for tag in accumulator.Tags()["scalars"]}
    assert scalars["entities_per_prompt"] == scalars["undetected_entities_per_prompt"] == 2
    assert scalars["pixel_loss"] > 0  # all-zero masks, as in the recipe


def test_push_to_hub_uploads_the_lora_and_never_the_token(tiny_paths, tmp_path):
    from huggingface_hub import ModelCard

    from hub_stand_in import HubStandIn

    token = "hf_trainingTestToken0123456789abcdef"
    output_dir = str(tmp_path / "pushed")
    with HubStandIn() as hub:
        env = dict(HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "hf_home"), HF_TOKEN=token)
        result = run_script("python", SCRIPT, tiny_args(
            tiny_paths, output_dir, max_train_steps=1, no_attribute_concentration=True, no_fidelity_preservation=True,
            report_to="tensorboard", push_to_hub=True, hub_model_id="someone/comat-test",
        ), extra_env=env)
    assert hub.authorizations == {f"Bearer {token}"}
    assert hub.files["pytorch_lora_weights.safetensors"] == open(os.path.join(output_dir, "pytorch_lora_weights.safetensors"), "rb").read()
    card = ModelCard(hub.files["README.md"].decode())
    assert card.data.base_model == tiny_paths["sd"] and "comat" in card.data.tags
    assert 'load_lora_weights("someone/comat-test")' in card.text
    assert token not in result.stdout
    assert all(token.encode() not in content for content in hub.files.values())
    for folder, _, files in os.walk(output_dir):  # model card, tracker config (hparams), logs, checkpoints
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                assert token.encode() not in f.read(), f"token written to {name}"


@pytest.mark.parametrize("case", ["no login", "no write access"])
def test_push_to_hub_is_checked_before_training(case, tiny_paths, tmp_path):
    from hub_stand_in import HubStandIn

    output_dir = tmp_path / "never"
    with HubStandIn(refuse=("create",)) as hub:
        env = dict(HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "hf_home"))
        if case == "no write access":
            env["HF_TOKEN"] = "hf_readOnlyToken0123456789abcdef"
        result = run_script("python", SCRIPT, tiny_args(tiny_paths, str(output_dir), push_to_hub=True), extra_env=env, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stdout and "optimizer steps" not in result.stdout
    expected = "run `hf auth login` (or set HF_TOKEN)" if case == "no login" else "cannot create or write the Hub repo never"
    assert expected in result.stdout
    assert not output_dir.exists()


def test_a_failed_upload_keeps_the_lora_and_says_how_to_retry(tiny_paths, tmp_path):
    from hub_stand_in import HubStandIn

    output_dir = str(tmp_path / "trained")
    with HubStandIn(refuse=("commit",)) as hub:
        env = dict(HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "hf_home"), HF_TOKEN="hf_token0123456789abcdef")
        result = run_script("python", SCRIPT, tiny_args(
            tiny_paths, output_dir, max_train_steps=1, no_attribute_concentration=True, no_fidelity_preservation=True,
            push_to_hub=True), extra_env=env, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stdout, result.stdout[-3000:]
    assert f"retry with: python pipeline_comat.py push --lora_dir {output_dir} --repo_id stand-in-user/trained" in result.stdout
    assert os.path.isfile(os.path.join(output_dir, "pytorch_lora_weights.safetensors"))
