"""fp16 on two processes: an overflow on one of them must be skipped by both, with the loss scales kept equal."""

import json
import os
import subprocess
import sys

from conftest import REPO_ROOT, script_env


def test_an_overflow_on_one_process_is_skipped_by_both_and_the_lora_stays_identical(tiny_paths, tmp_path):
    worker = os.path.join(REPO_ROOT, "tests", "workers", "fp16_overflow.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", worker,
               json.dumps(tiny_paths), str(tmp_path)]
    result = subprocess.run(command, env=script_env(), cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-5000:]
    records = [json.load(open(tmp_path / f"rank_{rank}.json")) for rank in (0, 1)]
    for record in records:
        assert record["overflow_step_skipped"] and record["unchanged_after_overflow"], record
        assert record["lr_steps_after_overflow"] == 0
        assert not record["second_step_skipped"] and record["changed_after_second_step"], record
        assert record["finite"] and record["in_sync"] is True, record
    scales = records[0]["scales_after_overflow"]
    assert scales[0] == scales[1] == 2.0**15
    assert records[0]["scales_after_second_step"][0] == records[0]["scales_after_second_step"][1]
