"""benchmarks/bench_iteration.py: real CoMat iterations timed by phase, and the loop's PhaseTimer it relies on."""

import json
import math
import subprocess
import sys

from conftest import REPO_ROOT, script_env
from utils.training_loop import ITERATION_PHASES, PhaseTimer


def test_phase_timer_does_nothing_unless_enabled_and_counts_nested_phases_once():
    disabled = PhaseTimer()
    with disabled.phase("captioner"):
        pass
    assert disabled.seconds == {}

    timer = PhaseTimer(enabled=True)
    # e.g. the UNet calls that gradient checkpointing recomputes in backward
    with timer.phase("generator_backward"), timer.phase("gradient_steps"):
        pass
    with timer.phase("generator_backward"):
        pass
    assert list(timer.seconds) == ["generator_backward"]
    assert timer.seconds["generator_backward"] > 0


def test_tiny_benchmark_reports_time_memory_phases_and_overhead(tmp_path):
    output = tmp_path / "bench.json"
    command = [
        sys.executable, "benchmarks/bench_iteration.py", "--arch", "tiny", "--num_inference_steps", "3",
        "--num_grad_steps", "2", "--warmup", "0", "--iterations", "1", "--model_dir", str(tmp_path / "models"),
        "--output", str(output),
    ]
    result = subprocess.run(
        command, check=False, env=script_env(), cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout[-4000:]
    assert "overhead" in result.stdout and "generator_backward" in result.stdout

    report = json.loads(output.read_text())
    (row,) = report["configurations"]
    assert row["name"] == "ours" and row["arch"] == "tiny" and len(row["iteration_seconds"]) == 1
    # All three modules ran, so every phase of the iteration took time, inside it and alone.
    assert set(row["phases_in_iteration"]) == set(row["phases_isolated"]) == set(ITERATION_PHASES)
    assert all(seconds > 0 for seconds in row["phases_in_iteration"].values())
    phases_and_rest = sum(row["phases_in_iteration"].values()) + row["untimed_in_iteration"]
    assert math.isclose(phases_and_rest, row["seconds_per_iteration"], rel_tol=1e-6)
    assert row["peak_memory_mib"] > 0 and row["peak_memory_kind"] == "peak RSS"
    assert math.isfinite(row["overhead_ratio"]) and row["overhead_ratio"] > 0
    assert math.isclose(row["overhead_ratio"], row["seconds_per_iteration"] / row["isolated_total_seconds"])
