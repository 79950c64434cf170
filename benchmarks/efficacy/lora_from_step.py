"""Where does a LoRA change the layouts, and where the binding? Sample with the LoRA switched on only from step k on.

Renders the held-out prompts of a split (8 seeds, the experiment's evaluation) with the base model for the first k of
the 20 DDPM steps and the LoRA from step k on, for each k of ``--from_steps``, and reads each set as the experiment
does: full-prompt accuracy (the judge's, its 95% CI and the paired difference to the base model with its CI; and with
every colour on the palette), the share of images the judge parses, background cleanliness, the Fréchet distance to
the renders, the objects' rows (mean ± SD: the variety of layouts) and the colours' distance off the palette. k = 0 is
the LoRA as users run it (the experiment's own numbers); the base model (k = 20) is always rendered, as the baseline.
The LoRA is switched by the timestep of each UNet call, so every image of every batch gets the same schedule.

    OMP_NUM_THREADS=2 python -m benchmarks.efficacy.lora_from_step --world_dir world --split balanced \\
        --lora efficacy-results/balanced-scene-in-place-full-w0.1-moment1-dlr5e-4-K5-seed1/runs/full_CoMat \\
        --from_steps 0,2,4,8 --output efficacy-results/lora_from_step_w0.1-moment1-seed1.json
"""

import argparse
import json
import os

from benchmarks.efficacy import world
from benchmarks.efficacy.experiment import GUIDANCE_SCALE, WorldJudgeScorer, fidelity
from pipeline_comat import lora_at_or_below_timestep
from utils import evaluation

REPORTED = ("full_prompt_accuracy", "full_prompt_accuracy_on_palette", "parsed", "background_cleanliness", "off_palette_distance")


def from_steps(world_dir, lora, steps, split="balanced", seeds=8, num_inference_steps=20, quick=False):
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(os.path.join(world_dir, "sd"), safety_checker=None)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.load_lora_weights(lora, adapter_name="evaluated", use_safetensors=True)
    pipeline.scheduler.set_timesteps(num_inference_steps)
    timesteps = [int(t) for t in pipeline.scheduler.timesteps]
    prompts = world.SPLITS[split][1][: 2 if quick else None]
    seed_list = list(range(seeds))
    generations = {}
    base = f"from step {num_inference_steps}"
    for k in sorted(set(steps) | {num_inference_steps}, reverse=True):
        first_lora_timestep = timesteps[k] if k < num_inference_steps else -1
        with lora_at_or_below_timestep(pipeline.unet, first_lora_timestep):
            generations[f"from step {k}"] = evaluation.generate(
                pipeline, {f"from step {k}": None}, prompts, seed_list, show_progress=False,
                num_inference_steps=num_inference_steps, guidance_scale=GUIDANCE_SCALE,
            )[f"from step {k}"]
    evaluation.score(generations, WorldJudgeScorer())
    summary = evaluation.summarize(generations, baseline=base)
    fidelity_by_model, _ = fidelity(generations, prompts, seed_list)
    results = {}
    for name in generations:
        entry = {metric: summary[name][metric]["mean"] for metric in REPORTED}
        accuracy = summary[name]["full_prompt_accuracy"]
        entry["full_prompt_accuracy_ci95"] = accuracy["ci95"]
        if name != base:
            entry["full_prompt_difference_to_base"] = accuracy["difference_to_" + base]
        entry.update({key: fidelity_by_model[name][key] for key in ("frechet_distance", "row_mean", "row_sd")})
        results[name] = entry
    return {"lora": lora, "split": split, "seeds": seeds, "prompts": len(prompts), "base": base, "from_steps": results}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world_dir", default="world", help="The built world (benchmarks.efficacy.pretrain). Default: world.")
    parser.add_argument("--lora", required=True, help="A LoRA folder (a run's output_dir or one of its checkpoint-N).")
    parser.add_argument("--split", default="balanced", choices=sorted(world.SPLITS), help="Whose held-out prompts. Default: balanced.")
    parser.add_argument("--from_steps", default="0,2,4,8", help="Steps k (0 to 20) from which the LoRA is on; the base model (20) is always rendered. Default: 0,2,4,8.")
    parser.add_argument("--seeds", type=int, default=8, help="Seeds per prompt. Default: 8 (the experiment's).")
    parser.add_argument("--output", default=None, help="JSON file of the results. Default: print only.")
    args = parser.parse_args(argv)
    try:
        args.from_steps = [int(k) for k in args.from_steps.split(",")]
    except ValueError:
        parser.error(f"--from_steps {args.from_steps}: give comma-separated integers, e.g. 0,4,8,12,20.")
    if not all(0 <= k <= 20 for k in args.from_steps):
        parser.error(f"--from_steps {args.from_steps}: each step must be between 0 and 20.")
    if not os.path.isfile(os.path.join(args.lora, "pytorch_lora_weights.safetensors")):
        parser.error(f"--lora {args.lora}: no pytorch_lora_weights.safetensors there; give a run's output_dir or checkpoint.")
    return args


def main(argv=None):
    args = parse_args(argv)
    results = from_steps(args.world_dir, args.lora, args.from_steps, args.split, args.seeds)
    for name, entry in results["from_steps"].items():
        low, high = (100 * bound for bound in entry["full_prompt_accuracy_ci95"])
        difference = entry.get("full_prompt_difference_to_base")
        paired = "" if difference is None else (
            f" (Δ {100 * difference['mean']:+.1f} [{100 * difference['ci95'][0]:+.1f}, {100 * difference['ci95'][1]:+.1f}])")
        print(f"{name}: full prompt {100 * entry['full_prompt_accuracy']:.1f}% [{low:.1f}, {high:.1f}]{paired}, on the palette "
              f"{100 * entry['full_prompt_accuracy_on_palette']:.1f}%, parsed {100 * entry['parsed']:.1f}%, background "
              f"{100 * entry['background_cleanliness']:.2f}%, Fréchet distance {entry['frechet_distance']:.3f}, "
              f"rows {entry['row_mean']:.1f} ± {entry['row_sd']:.1f}, off palette {entry['off_palette_distance']:.1f}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
