"""The paths users run and the fp32, one-process, one-micro-step tests do not: fp16 with a grad scaler, bf16,
gradient accumulation, the discriminator under gradient checkpointing, SDXL validation in half precision.

fp16 runs on CPU with ``torch.amp.GradScaler("cpu")`` (``make_accelerator`` adds it: accelerate makes none on
CPU), so the scaled backward, the unscale, the skipped overflow steps and the scale updates are the CUDA ones.
The two-process overflow test is in ``test_two_process_fp16.py``.
"""

import json
import logging
import os
import types

import pytest
import torch
from safetensors.torch import load_file

from conftest import run_script
from test_train_comat import tiny_args

PROMPTS = ["a red book and a blue cup", "a green cat and a white dog"]  # the same number of tokens


def build_iteration(tiny_paths, output_dir, family="sd", iteration_class=None, **overrides):
    """A CoMatIteration on the tiny models, through the scripts' own argument parsing and accelerator."""
    import train_comat
    import train_comat_sdxl
    from utils.training import make_accelerator
    from utils.training_loop import CoMatIteration

    script = train_comat if family == "sd" else train_comat_sdxl
    args = script.parse_args(tiny_args(tiny_paths, output_dir, base=family, **overrides))
    family_object = script.StableDiffusionFamily() if family == "sd" else script.StableDiffusionXLFamily()
    reset_accelerator_state()
    torch.manual_seed(0)  # LoRA and discriminator initialisation
    accelerator = make_accelerator(args)
    return (iteration_class or CoMatIteration)(args, family_object, accelerator, max_train_steps=10)


def reset_accelerator_state():
    """accelerate keeps one process-wide state: another mixed precision needs a fresh one."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def lora_state(comat):
    return [p.detach().clone() for p in comat.trainable_parameters]


# ---- Gradient accumulation -----------------------------------------------------------------------------


def _fixed_noise_iteration(noise_per_prompt):
    """A CoMatIteration whose samples start from fixed noise, per prompt: then one micro-step of two prompts and
    two micro-steps of one prompt each draw exactly the same samples."""
    from utils.training_loop import CoMatIteration

    class FixedNoiseIteration(CoMatIteration):
        def micro_step(self, batch_prompts, micro_step):
            self._batch_prompts = batch_prompts
            return super().micro_step(batch_prompts, micro_step)

        def sampling_noise(self, generator):
            return torch.cat([noise_per_prompt[p] for p in self._batch_prompts])

    return FixedNoiseIteration


def test_accumulating_two_micro_steps_of_one_prompt_equals_one_micro_step_of_two(tiny_paths, tmp_path):
    """accelerate's backward already divides by the accumulation steps; dividing again halved the gradients."""
    noise = {p: torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(i)) for i, p in enumerate(PROMPTS)}
    # Deterministic samples: DDIM adds no noise; with K = T and r = K no step is drawn; 64 px has no crop.
    common = dict(sampler="ddim", num_inference_steps=2, num_grad_steps=2, attention_loss_steps=2,
                  reference_latents_dir=str(tmp_path / "reference"), caption_loss_reduction="mean")
    iteration_class = _fixed_noise_iteration(noise)

    one_micro_step = build_iteration(tiny_paths, str(tmp_path / "a"), iteration_class=iteration_class, train_batch_size=2, **common)
    one_micro_step.micro_step(PROMPTS, 0)
    expected = [p.grad.clone() for p in one_micro_step.trainable_parameters]
    expected_norm = one_micro_step.update(True, 0)[0]["grad_norm"]

    accumulated = build_iteration(tiny_paths, str(tmp_path / "b"), iteration_class=iteration_class, train_batch_size=1,
                                  gradient_accumulation_steps=2, **common)
    for index, prompt in enumerate(PROMPTS):
        accumulated.micro_step([prompt], index)
    actual = [p.grad.clone() for p in accumulated.trainable_parameters]
    actual_norm = accumulated.update(True, 0)[0]["grad_norm"]

    assert sum(g.abs().sum().item() for g in expected) > 0
    for expected_grad, actual_grad in zip(expected, actual, strict=True):
        torch.testing.assert_close(actual_grad, expected_grad, rtol=1e-3, atol=1e-7)
    assert actual_norm == pytest.approx(expected_norm, rel=1e-3)


# ---- fp16: the grad scaler -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fp16_iteration(tiny_paths, tmp_path_factory):
    output_dir = str(tmp_path_factory.mktemp("fp16"))
    return build_iteration(tiny_paths, output_dir, mixed_precision="fp16", train_batch_size=1, num_inference_steps=2,
                           num_grad_steps=1, no_attribute_concentration=True)


def test_fp16_on_cpu_gets_a_grad_scaler_and_half_precision_models(fp16_iteration):
    assert isinstance(fp16_iteration.accelerator.scaler, torch.amp.GradScaler)
    assert fp16_iteration.unet.dtype == torch.float16
    assert all(p.dtype == torch.float32 for p in fp16_iteration.trainable_parameters)


def test_an_overflow_skips_the_step_lr_schedule_included_and_halves_the_scale(fp16_iteration):
    comat = fp16_iteration
    scaler = comat.accelerator.scaler
    losses, finite = comat.micro_step(PROMPTS[:1], 0)
    assert finite
    before, scale, lr_step = lora_state(comat), scaler.get_scale(), comat.lr_scheduler.last_epoch
    comat.lora_parameters[0].grad.view(-1)[0] = float("inf")  # an fp16 overflow in backward
    logs, _ = comat.update(True, 0)
    assert comat.optimizer.step_was_skipped
    assert all(torch.equal(b, a) for b, a in zip(before, lora_state(comat)))
    assert comat.lr_scheduler.last_epoch == lr_step
    assert logs["loss_scale"] == scale / 2 == scaler.get_scale()

    comat.micro_step(PROMPTS[:1], 1)
    comat.update(True, 1)
    assert not comat.optimizer.step_was_skipped
    assert comat.lr_scheduler.last_epoch == lr_step + 1
    assert any(not torch.equal(b, a) for b, a in zip(before, lora_state(comat)))
    assert all(torch.isfinite(p).all() for p in comat.trainable_parameters)


def test_the_loss_scale_goes_through_a_checkpoint(fp16_iteration, tmp_path):
    from utils.checkpointing import load_checkpoint, save_checkpoint

    comat = fp16_iteration
    scaler = comat.accelerator.scaler
    scaler.update(new_scale=1234.0)
    scaler._growth_tracker.fill_(7)
    accelerator = comat.accelerator
    save_checkpoint(accelerator, str(tmp_path), 3, comat.save_lora, [comat.optimizer], [comat.lr_scheduler], {},
                    comat.checkpointed_modules)
    assert json.load(open(tmp_path / "checkpoint-3" / "grad_scaler.json"))["scale"] == 1234.0
    scaler.update(new_scale=65536.0)
    scaler._growth_tracker.fill_(0)
    load_checkpoint(accelerator, str(tmp_path / "checkpoint-3"), comat.load_lora, [comat.optimizer],
                    [comat.lr_scheduler], comat.checkpointed_modules)
    assert scaler.get_scale() == 1234.0 and scaler._get_growth_tracker() == 7


def test_the_latent_anchors_train_under_the_fp16_grad_scaler(tiny_paths, tmp_path):
    comat = build_iteration(tiny_paths, str(tmp_path), mixed_precision="fp16", train_batch_size=1, num_inference_steps=2,
                            num_grad_steps=1, no_attribute_concentration=True, latent_moment_loss_weight=1.0,
                            kl_loss_weight=1.0)
    assert isinstance(comat.accelerator.scaler, torch.amp.GradScaler)
    losses, finite = comat.micro_step(PROMPTS[:1], 0)
    assert finite and losses["latent_moment_loss"].dtype == torch.float32 and losses["latent_moment_loss"] > 0
    assert losses["kl_loss"] == 0  # the LoRA starts as the base model
    before = lora_state(comat)
    comat.update(True, 0)
    assert not comat.optimizer.step_was_skipped
    assert any(not torch.equal(b, a) for b, a in zip(before, lora_state(comat)))
    losses, finite = comat.micro_step(PROMPTS[:1], 1)
    assert finite and losses["kl_loss"].dtype == torch.float32 and losses["kl_loss"] > 0


def test_lora_with_non_finite_values_is_refused_at_the_end():
    from utils.training import check_replicas_in_sync

    accelerator = types.SimpleNamespace(num_processes=1)
    check_replicas_in_sync([torch.ones(3)], accelerator)
    with pytest.raises(RuntimeError, match="non-finite"):
        check_replicas_in_sync([torch.tensor([1.0, float("nan")])], accelerator)


@pytest.mark.parametrize("precision,lora_layers", [("fp16", None), ("bf16", None), ("fp16", "attn2.to_k,attn2.to_v")])
def test_half_precision_training_run_with_accumulation(precision, lora_layers, tiny_paths, tmp_path):
    """The whole script: accumulation 2, a checkpoint (with the loss scale under fp16), a finite, trained LoRA, and
    the alignment evaluation rendered in half precision; also with the LoRA on the cross-attention keys/values only."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output_dir = tmp_path / precision
    run_script("python", "train_comat.py", tiny_args(
        tiny_paths, str(output_dir), mixed_precision=precision, gradient_accumulation_steps=2, train_batch_size=1, lora_layers=lora_layers,
        num_inference_steps=2, num_grad_steps=1, attention_loss_steps=1, max_train_steps=2, checkpointing_steps=1,
        gradient_checkpointing=True, report_to="tensorboard",
        eval_prompts="builtin:color", eval_steps=2, eval_num_prompts=1, blip_vqa_model=tiny_paths["blip_vqa"],
    ))
    lora = load_file(output_dir / "pytorch_lora_weights.safetensors")
    assert all(torch.isfinite(t).all() for t in lora.values())
    assert any(t.abs().sum() > 0 for k, t in lora.items() if "lora_B" in k or "lora.up" in k)
    assert (output_dir / "checkpoint-1" / "grad_scaler.json").is_file() == (precision == "fp16")
    accumulator = EventAccumulator(str(output_dir / "logs" / "comat"))
    accumulator.Reload()
    assert ("loss_scale" in accumulator.Tags()["scalars"]) == (precision == "fp16")
    curve = accumulator.Scalars("alignment/color/blip_vqa")
    assert [event.step for event in curve] == [0, 2] and all(0 < event.value < 1 for event in curve)


# ---- Discriminator under gradient checkpointing --------------------------------------------------------


def test_discriminator_forwards_keep_only_their_inputs_under_gradient_checkpointing(tiny_paths, tmp_path):
    def saved_tensors(comat):
        latents = torch.randn(2, 4, 32, 32, requires_grad=True)
        timestep = comat.sampling_scheduler.timesteps[-1]
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            comat.fidelity.generator_loss(latents, timestep)  # the adversarial G loss
            with comat.fidelity.trainable():
                comat.fidelity.discriminator_losses(latents.detach(), latents.detach(), timestep)  # both D forwards
        return len(saved)

    without = saved_tensors(build_iteration(tiny_paths, str(tmp_path / "a"), no_attribute_concentration=True))
    with_checkpointing = saved_tensors(build_iteration(
        tiny_paths, str(tmp_path / "b"), no_attribute_concentration=True, gradient_checkpointing=True
    ))
    assert with_checkpointing < 30 < without


# ---- SDXL validation in half precision with the stock VAE ----------------------------------------------


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_sdxl_validation_in_half_precision_with_the_stock_vae(precision, tiny_paths, tmp_path):
    import train_comat_sdxl
    from utils.training_loop import log_validation

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    args = train_comat_sdxl.parse_args(tiny_args(
        tiny_paths, str(tmp_path), base="sdxl", validation_prompt="a red book", num_validation_images=1, mixed_precision=precision,
    ))
    family = train_comat_sdxl.StableDiffusionXLFamily()
    family.load(args, dtype)
    assert family.vae.dtype == (torch.float32 if precision == "fp16" else dtype)  # the stock VAE sets force_upcast
    paths = log_validation(args, types.SimpleNamespace(trackers=[]), family, dtype, global_step=1)
    from PIL import Image

    assert Image.open(paths[0]).size == (args.resolution, args.resolution)


# ---- Loading: separate checkpoints, VAE precision, native resolution -----------------------------------


def test_a_separate_vae_and_unet_get_neither_the_base_revision_nor_its_variant(tiny_paths, tmp_path, monkeypatch):
    import train_comat_sdxl
    from diffusers import AutoencoderKL

    from utils import model_loading

    vae_dir = str(tmp_path / "vae")
    vae = AutoencoderKL.from_pretrained(tiny_paths["sdxl"], subfolder="vae")
    vae.register_to_config(force_upcast=False)  # an fp16-safe VAE, like madebyollin/sdxl-vae-fp16-fix
    vae.save_pretrained(vae_dir)
    calls = {}

    def recording_load(model_class, name_or_path, flag, **kwargs):
        calls.setdefault(flag, []).append(kwargs)
        return model_loading.load_pretrained(model_class, name_or_path, flag, **kwargs)

    monkeypatch.setattr(train_comat_sdxl, "load_pretrained", recording_load)
    args = train_comat_sdxl.parse_args(tiny_args(
        tiny_paths, str(tmp_path), base="sdxl", pretrained_vae_model_name_or_path=vae_dir,
        pretrained_unet_model_name_or_path=os.path.join(tiny_paths["sdxl"], "unet"), revision="main",
    ))
    family = train_comat_sdxl.StableDiffusionXLFamily()
    family.load(args, torch.float16)
    assert all(kwargs["revision"] == "main" for kwargs in calls["--pretrained_model_name_or_path"])
    for flag in ("--pretrained_vae_model_name_or_path", "--pretrained_unet_model_name_or_path"):
        assert [kwargs.get("revision") for kwargs in calls[flag]] == [None]
        assert [kwargs.get("variant") for kwargs in calls[flag]] == [None]
    assert family.vae.dtype == torch.float16  # force_upcast false: the VAE decodes in fp16


def test_resolution_defaults_to_the_models_native_size_and_another_one_is_said(tiny_paths, tmp_path, caplog):
    import train_comat

    args = train_comat.parse_args(tiny_args(tiny_paths, str(tmp_path), resolution=None))
    assert args.resolution is None
    family = train_comat.StableDiffusionFamily()
    family.load(args, torch.float32)
    assert args.resolution == family.unet.config.sample_size * 2  # the tiny VAE downsamples by 2
    caplog.set_level(logging.WARNING)
    args = train_comat.parse_args(tiny_args(tiny_paths, str(tmp_path), resolution=64))
    family.load(args, torch.float32)
    assert args.resolution == 64 and "native size is 16" in caplog.text


# ---- Sampler and logging -------------------------------------------------------------------------------


def test_sampling_scheduler_never_clips_or_thresholds_latents():
    from utils.differentiable_sampling import make_sampling_scheduler

    config = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
    for sampler in ("ddpm", "ddim"):
        for extra in ({}, {"clip_sample": True, "thresholding": True}):
            scheduler = make_sampling_scheduler(sampler, dict(config, **extra))
            assert scheduler.config.clip_sample is False and scheduler.config.thresholding is False


def test_diffusers_does_not_log_a_line_per_sampling_step(capsys):
    """A CPU generator drawing DDPM noise for CUDA tensors makes diffusers log at INFO on every step."""
    from accelerate import Accelerator
    from diffusers.utils.torch_utils import randn_tensor

    from utils.training import configure_logging

    configure_logging(Accelerator(cpu=True))
    randn_tensor((1, 4), generator=torch.Generator("cpu"), device=torch.device("meta"))
    assert "generator was created on" not in capsys.readouterr().err


# ---- Reference latents ---------------------------------------------------------------------------------


def test_reference_latents_are_sampled_in_one_batch_and_do_not_depend_on_it(tiny_paths, tmp_path):
    comat = build_iteration(tiny_paths, str(tmp_path), no_attribute_concentration=True)
    calls = []
    original = comat.predict_noise
    comat.predict_noise = lambda *a, **k: calls.append(a[0].shape[0]) or original(*a, **k)
    together = comat.generate_reference_latents(PROMPTS)
    assert calls == [2 * len(PROMPTS)] * comat.args.num_inference_steps  # one CFG batch per step, not per prompt
    alone = torch.cat([comat.generate_reference_latents([p]) for p in PROMPTS])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-4)  # batched UNet calls round differently


def test_prepare_reference_latents_only_fills_the_cache_and_trains_nothing(tiny_paths, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red book\na blue cup\na green cat\n")
    output_dir = tmp_path / "out"
    cache = tmp_path / "cache"
    result = run_script("python", "train_comat.py", tiny_args(
        tiny_paths, str(output_dir), train_data=str(prompts), train_batch_size=2, reference_latents_dir=str(cache),
        prepare_reference_latents_only=True, no_attribute_concentration=True,
    ))
    assert len([n for n in os.listdir(cache) if n.endswith(".safetensors")]) == 3
    assert not (output_dir / "pytorch_lora_weights.safetensors").exists()
    assert "Reference latents ready" in result.stdout
    shared = tmp_path / "shared_cache"  # two processes split the prompts and fill one cache
    run_script("torchrun", "train_comat.py", tiny_args(
        tiny_paths, str(tmp_path / "out2"), train_data=str(prompts), train_batch_size=1, reference_latents_dir=str(shared),
        prepare_reference_latents_only=True, no_attribute_concentration=True,
    ), num_processes=2)
    assert sorted(os.listdir(shared)) == sorted(os.listdir(cache))

    import train_comat

    with pytest.raises(SystemExit) as exit_info:  # a parse-time refusal: no process to start
        train_comat.parse_args(tiny_args(tiny_paths, str(output_dir), prepare_reference_latents_only=True, no_fidelity_preservation=True))
    assert exit_info.value.code == 2 and "--prepare_reference_latents_only" in capsys.readouterr().err


# ---- Another segmenter and caption scorer --------------------------------------------------------------


def test_a_segmenter_and_a_caption_scorer_named_by_flag_replace_grounded_sam_and_blip(tiny_paths, tmp_path):
    log = tmp_path / "plugins.log"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red traffic light and a blue cup\n")
    output_dir = tmp_path / "out"
    run_script("python", "train_comat.py", tiny_args(
        tiny_paths, str(output_dir), train_data=str(prompts), train_batch_size=1, max_train_steps=1,
        no_fidelity_preservation=True, segmenter="tests.workers.recording_plugins:load",
        caption_scorer="tests.workers.recording_plugins:load_caption_scorer", caption_loss_reduction="sum",
        token_loss_weight=0, pixel_loss_weight=0,  # the LoRA moves by the scorer's gradient alone
        grounding_model_name_or_path="/nonexistent", sam_model_name_or_path="/nonexistent",  # never loaded
        caption_model_name_or_path="/nonexistent",
    ), extra_env={"RECORDING_PLUGIN_LOG": str(log)})
    assert log.read_text().splitlines() == [
        "segmenter [['traffic light', 'cup']]", "caption_scorer ['a red traffic light and a blue cup'] sum",
    ]
    lora = load_file(output_dir / "pytorch_lora_weights.safetensors")
    assert any(t.abs().sum() > 0 for k, t in lora.items() if "lora_B" in k or "lora.up" in k)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_a_caption_scorer_named_by_flag_trains_in_half_precision_with_accumulation(precision, tiny_paths, tmp_path, monkeypatch):
    monkeypatch.setenv("RECORDING_PLUGIN_LOG", str(tmp_path / "plugins.log"))
    comat = build_iteration(tiny_paths, str(tmp_path), caption_scorer="tests.workers.recording_plugins:load_caption_scorer",
                            mixed_precision=precision, gradient_accumulation_steps=2, train_batch_size=1, num_inference_steps=2,
                            num_grad_steps=1, no_attribute_concentration=True, no_fidelity_preservation=True)
    assert comat.caption_scorer.dtype == comat.weight_dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    for micro_step in range(2):
        _, finite = comat.micro_step(PROMPTS[:1], micro_step)
        assert finite
    gradients = [p.grad for p in comat.lora_parameters if p.grad is not None]
    assert gradients and all(torch.isfinite(g).all() for g in gradients) and any(g.abs().sum() > 0 for g in gradients)
    assert len((tmp_path / "plugins.log").read_text().splitlines()) == 2


def test_a_caption_scorer_whose_loss_is_not_connected_to_the_images_is_refused(tiny_paths, tmp_path):
    comat = build_iteration(tiny_paths, str(tmp_path), caption_scorer="tests.workers.recording_plugins:load_constant_scorer",
                            no_attribute_concentration=True, no_fidelity_preservation=True, num_inference_steps=2, num_grad_steps=1)
    with pytest.raises(RuntimeError, match="recording_plugins:load_constant_scorer.*not connected to the images"):
        comat.micro_step(PROMPTS, 0)


def test_a_caption_scorer_that_cannot_be_imported_is_named():
    from utils.concept_matching import load_caption_scorer

    with pytest.raises(ValueError, match="--caption_scorer no_such_module:load: cannot import 'load'.*NAME\\(args, dtype\\)"):
        load_caption_scorer(types.SimpleNamespace(caption_scorer="no_such_module:load"), torch.float32)
