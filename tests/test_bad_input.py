"""Bad input to train_comat.py: a clear message naming the flag, never a traceback alone or a corrupt output."""

import json
import os
import shutil
import subprocess

import pytest

from conftest import REPO_ROOT, launch_command, run_script, script_env
from test_train_comat import tiny_args

SCRIPT = "train_comat.py"


def _fails_with(args, message):
    result = run_script("python", SCRIPT, args, check=False)
    assert result.returncode != 0, result.stdout[-3000:]
    assert message in result.stdout, result.stdout[-3000:]
    assert "Traceback" not in result.stdout, result.stdout[-3000:]
    return result


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"train_data": "/nonexistent/prompts.txt"}, "--train_data"),
        ({"caption_model_name_or_path": "Salesforce/blip-image-captioning-large"}, "Could not load --caption_model_name_or_path"),
        ({"pretrained_model_name_or_path": "stable-diffusion-v1-5/stable-diffusion-v1-5"}, "Could not load --pretrained_model_name_or_path"),
        ({"segmenter": "no_such_module:load"}, "--segmenter no_such_module:load: cannot import 'load'"),
        ({"lora_layers": "to_q,attn3.to_k"}, "--lora_layers: no linear layer of the UNet is named 'attn3.to_k'"),
    ],
)
def test_bad_flags(tiny_paths, tmp_path, overrides, message):
    args = tiny_args(tiny_paths, str(tmp_path / "out"), **overrides)
    _fails_with(args, message)
    assert not os.path.exists(tmp_path / "out"), "a run that fails before training leaves no output folder"


@pytest.mark.parametrize("overrides,message", [
    ({"lr_scheduler": "cosin"}, "--lr_scheduler: invalid choice: 'cosin'"),
    ({"report_to": "tensorbaord"}, "--report_to: invalid choice: 'tensorbaord'"),
    ({"learning_rate": 0}, "--learning_rate must be positive, got 0.0"),
    ({"learning_rate": -0.001}, "--learning_rate must be positive, got -0.001"),
    ({"rank": 0}, "--rank must be at least 1, got 0"),
    ({"checkpointing_steps": 0}, "--checkpointing_steps must be at least 1"),
    ({"validation_steps": 0}, "--validation_steps must be at least 1"),
    ({"resolution": 0}, "--resolution must be at least 1"),
    ({"max_nonfinite_steps": 0}, "--max_nonfinite_steps must be at least 1"),
    ({"report_to": "wandb"}, "--report_to wandb needs wandb, which is not installed"),
    ({"resolution": 100}, "--resolution 100 is not a multiple of 8"),
    ({"num_grad_steps": 5, "num_inference_steps": 4}, "--num_grad_steps 5 must be between 1 and --num_inference_steps"),
    ({"segmenter": "my_segmenter"}, "--segmenter my_segmenter: give MODULE:NAME"),
    ({"caption_scorer": "my_scorer"}, "--caption_scorer my_scorer: give MODULE:NAME"),
    ({"lora_layers": " , "}, "--lora_layers names no layer"),
    ({"kl_loss_weight": -1}, "--kl_loss_weight -1.0 must be 0 (off) or positive"),
    ({"kl_loss_weight": 1.0, "kl_loss_min_timestep": -1}, "--kl_loss_min_timestep -1 must be 0"),
    ({"kl_loss_min_timestep": 700}, "--kl_loss_min_timestep restricts the KL penalty, which is off"),
    ({"latent_moment_loss_weight": -1}, "--latent_moment_loss_weight -1.0 must be 0 (off) or positive"),
    ({"latent_moment_loss_weight": 1.0, "no_fidelity_preservation": True}, "--latent_moment_loss_weight compares the latents with Fidelity Preservation's"),
])
def test_bad_flag_values_are_refused_by_the_parser(tiny_paths, tmp_path, capsys, overrides, message):
    """The checks of parse_args (the script's first step): the message alone, exit code 2, before anything loads."""
    import train_comat

    with pytest.raises(SystemExit) as exit_info:
        train_comat.parse_args(tiny_args(tiny_paths, str(tmp_path / "out"), **overrides))
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_run_time_input_errors_end_with_the_message_alone_and_exit_code_2(tiny_paths, tmp_path):
    """Errors found once the prompts and the output folder are read, each in its own run (side by side)."""
    three_prompts = tmp_path / "three.txt"
    three_prompts.write_text("a red cube\na blue ball\na green cup\n")
    cases = [
        ({"train_data": str(three_prompts), "train_batch_size": 4}, "--train_data has 3 prompts, fewer than one batch for every process (4 × 1)"),
        ({"resume_from_checkpoint": "/nonexistent/checkpoint-3"}, "--resume_from_checkpoint '/nonexistent/checkpoint-3' is not a complete checkpoint"),
    ]
    processes = []
    for index, (overrides, message) in enumerate(cases):
        command = launch_command("python", SCRIPT) + tiny_args(tiny_paths, str(tmp_path / f"out{index}"), **overrides)
        processes.append((subprocess.Popen(command, env=script_env(), cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                           stderr=subprocess.STDOUT, text=True), message))
    for process, message in processes:
        output = process.communicate(timeout=300)[0]
        assert process.returncode == 2 and message in output and "Traceback" not in output, (message, output[-2000:])


def test_empty_train_data(tiny_paths, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    _fails_with(tiny_args(tiny_paths, str(tmp_path / "out"), train_data=str(empty)), "contains no prompts")


def test_sdxl_checkpoint_points_to_the_sdxl_script(tiny_paths, tmp_path):
    args = tiny_args(tiny_paths, base="sdxl", output_dir=str(tmp_path / "out"))
    _fails_with(args, "train_comat_sdxl.py")


def test_a_damaged_weights_file_of_the_base_model_is_named(tiny_paths, tmp_path):
    base = tmp_path / "sd"
    shutil.copytree(tiny_paths["sd"], base)
    weights = base / "text_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a download cut short
    _fails_with(tiny_args(tiny_paths, str(tmp_path / "out"), pretrained_model_name_or_path=str(base)),
                f"{weights} is damaged")


def test_long_prompts_are_truncated_with_one_warning(tiny_paths, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    long_prompt = "a red book and a yellow vase " * 20
    with open(prompts, "w") as f:
        for prompt in [long_prompt, "a green apple", long_prompt + "on a table"]:
            f.write(json.dumps({"prompt": prompt}) + "\n")
    result = run_script("python", SCRIPT, tiny_args(tiny_paths, str(tmp_path / "out"), train_data=str(prompts), max_train_steps=1, train_batch_size=3))
    assert result.stdout.count("longer than the text encoder's 77 tokens") == 1
    assert "2 of 3 prompts" in result.stdout
    assert os.path.isfile(tmp_path / "out" / "pytorch_lora_weights.safetensors")


def test_every_flag_is_documented_in_the_readme():
    import train_comat
    import train_comat_sdxl

    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")) as f:
        readme = f.read()
    for module in (train_comat, train_comat_sdxl):
        for action in module.build_parser()._actions:
            for flag in action.option_strings:
                if flag in ("-h", "--help"):
                    continue
                documented = "--" + flag.removeprefix("--no_") if flag.startswith("--no_") else flag
                assert f"`{documented}`" in readme, f"{flag} of {module.__name__} is not in README.md"
                assert action.help, f"{flag} of {module.__name__} has no help string"
