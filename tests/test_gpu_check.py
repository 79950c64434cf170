"""benchmarks/gpu_check.sh is run only where a GPU is lent: its argument handling and its commands are checked here."""

import json
import shlex
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from conftest import REPO_ROOT, script_env

SCRIPT = ["bash", "benchmarks/gpu_check.sh"]


def run(*args, env=None):
    return subprocess.run(SCRIPT + list(args), cwd=REPO_ROOT, env=dict(script_env(), PYTHON=sys.executable, **(env or {})),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)


def test_dry_run_lists_the_recipe_sizes_and_each_command_parses(capsys):
    sys.path.insert(0, f"{REPO_ROOT}/benchmarks")
    import bench_iteration
    import train_comat

    result = run("--dry_run", "--output_dir", "out")
    assert result.returncode == 0, result.stdout
    commands = [shlex.split(line) for line in result.stdout.splitlines()]
    benches = [c[c.index("benchmarks/bench_iteration.py") + 1:] for c in commands if "benchmarks/bench_iteration.py" in c]
    assert [(b[b.index("--arch") + 1], b[b.index("--resolution") + 1], b[b.index("--batch_size") + 1]) for b in benches] == [
        ("sd15", "512", "4"), ("sdxl", "1024", "1"), ("sdxl", "512", "6")]
    for bench in benches:
        assert "--mixed_precision" in bench and bench[bench.index("--mixed_precision") + 1] == "fp16"
        with pytest.raises(SystemExit):  # every flag parses; only the missing GPU is refused
            bench_iteration.parse_args(bench)
        assert "no CUDA device" in capsys.readouterr().err
    assert "--reference_style" in benches[0]
    train = next(c for c in commands if "train_comat.py" in c)
    args = train_comat.parse_args(train[train.index("train_comat.py") + 1:])
    assert (args.mixed_precision, args.gradient_accumulation_steps, args.max_train_steps) == ("fp16", 2, 20)
    assert any("--check_lora" in c for c in commands)


def test_only_bad_arguments_and_a_missing_gpu_end_with_a_message():
    only_sdxl = run("--dry_run", "--only", "sdxl").stdout
    assert "--arch sdxl" in only_sdxl and "--arch sd15" not in only_sdxl and "train_comat.py" not in only_sdxl
    for args, message in ((["--bogus"], "unknown argument '--bogus'"), (["--only", "sd21"], "not 'sd21'"), (["--output_dir"], "usage")):
        result = run(*args)
        assert result.returncode == 2 and message in result.stdout, result.stdout
    if not torch.cuda.is_available():
        result = run()
        assert result.returncode == 2 and "no CUDA device" in result.stdout


def test_table_and_lora_check(tmp_path):
    report = {"configurations": [
        {"name": "ours", "seconds_per_iteration": 9.5, "peak_memory_mib": 30000, "overhead_ratio": 1.02},
        {"name": "reference_style", "seconds_per_iteration": 12.0, "peak_memory_mib": 41000},
    ]}
    (tmp_path / "sd15_512_b4.json").write_text(json.dumps(report))
    (tmp_path / "train_fp16_ga2.json").write_text(json.dumps({"seconds": 95}))
    table = subprocess.run([sys.executable, "benchmarks/gpu_check_table.py", "--output_dir", str(tmp_path)], cwd=REPO_ROOT,
                           stdout=subprocess.PIPE, text=True, check=True).stdout
    assert "| SD1.5 arch., 512 px, batch 4, T 50, K 5, fp16 | reference style | 12.00 | 41,000 MiB | – |" in table
    assert "95 s in all" in table and (tmp_path / "table.md").read_text() in table + "\n"
    for values, returncode in (([1.0, 2.0], 0), ([1.0, float("nan")], 1)):
        save_file({"w": torch.tensor(values)}, str(tmp_path / "pytorch_lora_weights.safetensors"))
        check = subprocess.run([sys.executable, "benchmarks/gpu_check_table.py", "--check_lora", str(tmp_path)], cwd=REPO_ROOT)
        assert check.returncode == returncode
