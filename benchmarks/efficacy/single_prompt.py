"""Can CoMat teach one prompt's binding through our sampler and LoRA? The shapes world's one-prompt probe.

The held-out experiment asks for transfer from 28 fine-tune prompts to others; this probe asks the narrower
question underneath it: fine-tuned on a single prompt the base model gets wrong (the prompt repeated to fill each
batch), does the generator learn to draw *that* prompt? It runs the real ``train_comat.py`` (``experiment.finetune``,
the experiment's settings unless a flag changes them), then renders the prompt on seeds 100… (never used in
training) with the base model and each checkpoint, judges every image, and writes ``OUTPUT/results.json``,
``OUTPUT/results.md`` and ``OUTPUT/single_prompt.png`` (base and checkpoints side by side, same seeds). With
``--related_prompts`` it also measures transfer: base vs the final LoRA on every other prompt naming one of the
prompt's objects (the same two in the other order; one of them with another object).

``--prompt`` given several times trains on those few prompts together (each as many lines of the prompts file; when
their number divides the batch, every batch holds each equally often) and reports each one as well as all together:
what changes between one prompt and many (e.g. two prompts that pull the same object towards different colours).

    OMP_NUM_THREADS=2 python -m benchmarks.efficacy.single_prompt --world_dir world --output_dir efficacy-results/single-prompt
    python -m benchmarks.efficacy.single_prompt --quick --world_dir /tmp/w --output_dir /tmp/s   # mechanics only
"""

import argparse
import json
import logging
import os
import shlex
import time

from benchmarks.efficacy import experiment, world
from benchmarks.efficacy.pretrain import build_world
from utils import evaluation

DEFAULT_PROMPT = "a green triangle and a blue circle"  # two held-out pairs; the base model draws their swap
FIRST_SEED = 100
METRICS = ("full_prompt_accuracy", "full_prompt_accuracy_on_palette", "color_accuracy", "color_leak_rate", "all_shapes_drawn", "parsed", "background_cleanliness")


def related_prompts(prompt):
    """The other two-object world prompts that name one or both of ``prompt``'s objects, by relation to it."""
    trained = set(world.objects_of(prompt))
    groups = {"same objects, other order": [], "shares one object": []}
    for candidate in world.TWO_OBJECT_PROMPTS:
        shared = trained & set(world.objects_of(candidate))
        if candidate != prompt and shared:
            groups["same objects, other order" if len(shared) == 2 else "shares one object"].append(candidate)
    return groups


def markdown(summary):
    """Percentages of METRICS, then the objects' mean colour distance off the palette (RGB units)."""
    header = [m.replace("_", " ") for m in METRICS] + ["off palette distance"]
    lines = ["| model | " + " | ".join(header) + " |", "|---|" + "---:|" * len(header)]
    for name, row in summary.items():
        off_palette = row.get("off_palette_distance", {}).get("mean", float("nan"))
        lines.append(f"| {name} | " + " | ".join(f"{100 * row[m]['mean']:.1f}" for m in METRICS) + f" | {off_palette:.1f} |")
    return "\n".join(lines) + "\n"


def of_prompt(generations, prompt):
    """The images of one prompt out of generations rendered on several."""
    subsets = {}
    for name, generation in generations.items():
        keep = [i for i, p in enumerate(generation.prompts) if p == prompt]
        subsets[name] = evaluation.Generation(name, [prompt] * len(keep), [generation.seeds[i] for i in keep],
                                              [generation.images[i] for i in keep], [generation.scores[i] for i in keep])
    return subsets


def run(args):
    from diffusers import StableDiffusionPipeline

    recipe = "quick" if args.quick else "full"
    # The settings this probe's README results were measured with (the main table's until 2026-11-30).
    settings = dict(experiment.SETTINGS["quick" if args.quick else "2026-11"], max_train_steps=args.max_train_steps if not args.quick else 2)
    captioner = args.captioner or os.path.join(args.world_dir, "blip-adversarial-32")
    if not os.path.isdir(captioner):
        raise SystemExit(f"--captioner {captioner} does not exist: build it with `python -m benchmarks.efficacy.pretrain "
                         f"--world_dir {args.world_dir} --adversarial_captioner 32 --adversarial_steps 600` or pass another.")
    build_world(args.world_dir, recipe)
    start = time.perf_counter()
    # Each prompt as many lines, at least one batch in all (one batch exactly when the prompts' number divides it).
    prompts = [p for p in args.prompt for _ in range(-(-settings["train_batch_size"] // len(args.prompt)))]
    flags = experiment.RUNS[args.run] + shlex.split(args.train_flags)
    run_dir = experiment.finetune(args.run, flags, args.world_dir, args.output_dir, settings, args.threads, captioner,
                                  args.checkpointing_steps, prompts=prompts)
    finetune_seconds = time.perf_counter() - start
    models = {"base": None, **{f"@ {step}": lora for step, lora in
                               experiment.lora_by_step(run_dir, args.checkpointing_steps, settings["max_train_steps"]).items()}}

    pipeline = StableDiffusionPipeline.from_pretrained(os.path.join(args.world_dir, "sd"), safety_checker=None)
    pipeline.set_progress_bar_config(disable=True)
    seeds = list(range(FIRST_SEED, FIRST_SEED + (1 if args.quick else args.seeds)))
    generations = evaluation.generate(pipeline, models, args.prompt, seeds, show_progress=False,
                                      num_inference_steps=settings["num_inference_steps"], guidance_scale=experiment.GUIDANCE_SCALE)
    evaluation.score(generations, experiment.WorldJudgeScorer())
    summary = evaluation.summarize(generations, baseline="base")
    os.makedirs(args.output_dir, exist_ok=True)
    shown = [i * len(seeds) + j for i in range(len(args.prompt)) for j in range(min(8 // len(args.prompt) or 1, len(seeds)))]
    evaluation.side_by_side(generations, shown, os.path.join(args.output_dir, "single_prompt.png"), scale=3)
    table = markdown(summary)
    per_prompt = {}
    if len(args.prompt) > 1:
        for prompt in args.prompt:
            per_prompt[prompt] = evaluation.summarize(of_prompt(generations, prompt), baseline="base")
            table += f'\n"{prompt}" ({len(seeds)} seeds):\n\n' + markdown(per_prompt[prompt])
    related = {}
    if args.related_prompts:
        # Does what CoMat learned on one prompt carry to others? The final LoRA on every prompt sharing an object.
        final = {"base": None, f"@ {settings['max_train_steps']}": run_dir}
        for group, group_prompts in related_prompts(args.prompt[0]).items():
            group_generations = evaluation.generate(pipeline, final, group_prompts, seeds[:8], show_progress=False,
                                                    num_inference_steps=settings["num_inference_steps"], guidance_scale=experiment.GUIDANCE_SCALE)
            evaluation.score(group_generations, experiment.WorldJudgeScorer())
            related[group] = dict(prompts=group_prompts, summary=evaluation.summarize(group_generations, baseline="base"))
            table += f"\n{group} ({len(group_prompts)} prompts × {len(seeds[:8])} seeds):\n\n" + markdown(related[group]["summary"])
    results = dict(recipe=recipe, prompts=args.prompt, run=args.run, train_flags=args.train_flags, captioner=captioner,
                   settings=settings, seeds=seeds, summary=summary, per_prompt=per_prompt, related=related, training_curves=experiment.training_curves(run_dir),
                   seconds=dict(finetune=finetune_seconds, total=time.perf_counter() - start))
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(table)
    print(f"{' + '.join(args.prompt)}, {args.run}, captioner {captioner}, {len(seeds)} seeds:\n{table}")
    return results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world_dir", default="world", help="The world's models (built there when missing).")
    parser.add_argument("--output_dir", default="efficacy-results/single-prompt", help="Fine-tune, picture, results.")
    parser.add_argument("--prompt", action="append", default=None,
                        help=f'A two-object world prompt to fine-tune on; give it several times to fine-tune on those prompts together (default: "{DEFAULT_PROMPT}").')
    parser.add_argument("--run", default="caption only", choices=list(experiment.RUNS), help="Which CoMat (default: caption only).")
    parser.add_argument("--captioner", default=None, help="Captioner (default: WORLD_DIR/blip-adversarial-32, from pretrain.py --adversarial_captioner 32).")
    parser.add_argument("--train_flags", default="", help='More train_comat.py flags for the fine-tune, e.g. "--caption_loss_weight 0 --token_loss_weight 0.1" (default: none; one flag alone: --train_flags=--FLAG).')
    parser.add_argument("--max_train_steps", type=int, default=150, help="Fine-tune steps (default: 150).")
    parser.add_argument("--checkpointing_steps", type=int, default=50, help="Evaluate a checkpoint every N steps (default: 50).")
    parser.add_argument("--seeds", type=int, default=32, help="Evaluation seeds, from 100 (default: 32).")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")), help="Threads of the fine-tune.")
    parser.add_argument("--related_prompts", action="store_true", help="Also evaluate the final LoRA on every other prompt that names one of the prompt's objects (transfer).")
    parser.add_argument("--quick", action="store_true", help="Seconds-long run of every stage on the quick world: the mechanics.")
    args = parser.parse_args(argv)
    args.prompt = args.prompt or [DEFAULT_PROMPT]
    for prompt in args.prompt:
        try:
            objects = world.objects_of(prompt)
        except ValueError:
            objects = []
        if len(objects) != 2 or any(o.color not in world.COLORS or o.shape not in world.SHAPES for o in objects):
            parser.error(f'--prompt "{prompt}" is not a two-object world prompt such as "{DEFAULT_PROMPT}".')
    if len(set(args.prompt)) != len(args.prompt):
        parser.error("--prompt: give each prompt once (every prompt already gets an equal share of the prompts file).")
    if args.related_prompts and len(args.prompt) > 1:
        parser.error("--related_prompts measures transfer from one prompt: give --prompt once.")
    experiment.check_train_flags(parser, args.train_flags)
    if args.max_train_steps < 1 or args.checkpointing_steps < 1 or args.seeds < 1:
        parser.error("--max_train_steps, --checkpointing_steps and --seeds must be at least 1.")
    return args


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO)
    run(args)


if __name__ == "__main__":
    main()
