"""How many of the efficacy experiment's fine-tunes to run at once (``experiment.py --concurrent_finetunes``).

Runs the main preset's three fine-tunes (caption only, + attribute concentration, full CoMat) for ``--steps`` steps,
1, 2, ... at a time, each on ``--threads`` threads, on a quick world (the full world's architectures, so the same cost
per step; built into ``--world_dir`` when missing), and reports the wall-clock seconds of each setting and whether
its LoRAs equal those of one run at a time bit for bit.

    OMP_NUM_THREADS=2 python -m benchmarks.bench_concurrent_finetunes --output bench-results/concurrent_finetunes.json
"""

import argparse
import json
import os
import shutil
import time

import torch
from safetensors.torch import load_file

from benchmarks.efficacy import experiment, world
from benchmarks.efficacy.pretrain import build_world


def same_loras(run_dirs, other_run_dirs):
    for name, run_dir in run_dirs.items():
        ours = load_file(os.path.join(run_dir, "pytorch_lora_weights.safetensors"))
        theirs = load_file(os.path.join(other_run_dirs[name], "pytorch_lora_weights.safetensors"))
        if ours.keys() != theirs.keys() or not all(torch.equal(ours[key], theirs[key]) for key in ours):
            return False
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world_dir", default="bench-results/quick-world", help="A quick world (built there when missing; default: bench-results/quick-world).")
    parser.add_argument("--output_dir", default="bench-results/concurrent-finetunes", help="The fine-tunes (default: bench-results/concurrent-finetunes).")
    parser.add_argument("--steps", type=int, default=10, help="Steps of each fine-tune (default: 10).")
    parser.add_argument("--concurrent", default="1,2,3", help="Comma-separated fine-tunes at once to time; the first is the reference for the LoRAs (default: 1,2,3).")
    parser.add_argument("--threads", type=int, default=2, help="Threads of each fine-tune (default: 2, the experiment's).")
    parser.add_argument("--output", default=None, help="Also write the results to this JSON file (default: print only).")
    args = parser.parse_args(argv)
    counts = [int(count) for count in args.concurrent.split(",")]
    if min(counts) < 1:
        parser.error(f"--concurrent {args.concurrent}: each count at least 1.")

    build_world(args.world_dir, "quick")
    settings = dict(experiment.SETTINGS["main"], max_train_steps=args.steps)
    captioner = os.path.join(args.world_dir, experiment.PRESETS["main"]["captioner"])
    prompts = world.SPLITS[experiment.PRESETS["main"]["split"]][0]
    results, reference = [], None
    for concurrent in counts:
        output_dir = os.path.join(args.output_dir, f"at-once-{concurrent}")
        shutil.rmtree(output_dir, ignore_errors=True)  # timed from scratch, never reused
        start = time.perf_counter()
        run_dirs = experiment.finetunes(dict(experiment.RUNS), args.world_dir, output_dir, settings, args.threads, captioner,
                                        prompts=prompts, concurrent=concurrent)
        seconds = time.perf_counter() - start
        reference = reference or run_dirs
        results.append(dict(concurrent=concurrent, seconds=round(seconds, 1), same_loras_as_first=same_loras(run_dirs, reference)))
        print(json.dumps(results[-1]), flush=True)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(dict(steps=args.steps, threads=args.threads, results=results), f, indent=2)


if __name__ == "__main__":
    main()
