"""Does CoMat make a model follow its prompts better? The shapes-world experiment, end to end.

1. Builds (or reuses) the world's pretrained models (``pretrain.py``).
2. Fine-tunes them with the real ``train_comat.py`` — flags only, on prompts only — three times: caption loss
   only; + attribute concentration; + fidelity preservation (full CoMat). The segmenter is the world's exact one,
   plugged in with ``--segmenter``; the captioner, split and settings are ``--preset``'s (``SETTINGS``, ``PRESETS``).
   Two run at a time (``--concurrent_finetunes``), then the third alone, each logging beside its folder
   (``OUTPUT/runs/full_CoMat.log``, ...).
3. Renders the held-out evaluation prompts (never fine-tuned on, never seen by pretraining in a two-object scene)
   with the stock ``StableDiffusionPipeline``, base and each LoRA, on the same seeds; the exact judge scores
   every image (``utils.evaluation``: bootstrap 95% CIs, paired differences to the base model).
4. Fidelity: background cleanliness, share of images the judge can parse, how far the objects' colours are off the
   palette, and a Fréchet distance between generated and rendered images (8 × 8 × 3 area-downsampled pixels as
   features), with the base model's on as many other seeds beside it: the distance's own seed noise.
5. Writes ``OUTPUT/results.json``, ``OUTPUT/results.md`` (the README table), ``OUTPUT/samples.png`` (base vs CoMat,
   same seeds) and ``OUTPUT/token_activations.png`` (``pipeline_comat.py activations``, base vs CoMat).

    OMP_NUM_THREADS=2 python -m benchmarks.efficacy.experiment --world_dir world --output_dir efficacy-results
    python -m benchmarks.efficacy.experiment --quick --world_dir /tmp/w --output_dir /tmp/e   # mechanics only
"""

import argparse
import concurrent.futures as concurrent_futures
import json
import logging
import os
import shlex
import subprocess
import sys
import time

import numpy as np
import torch

from benchmarks.efficacy import world
from benchmarks.efficacy.pretrain import build_world
from utils import evaluation

logger = logging.getLogger(__name__)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RUNS = {
    "caption only": ["--no_attribute_concentration", "--no_fidelity_preservation"],
    "+ attribute concentration": ["--no_fidelity_preservation"],
    "full CoMat": [],
}
SETTINGS = {
    # The main table (README, "Does it work?", since 2026-12-01). Its captioner, the world's fine-tuned with mixup
    # between bindings, has no ridge between a swapped binding and the right one; K = 5 gradient steps of 20 at lr 1e-3
    # learn about twice as fast as K = 2 at 1e-4; the KL penalty (every run) and the latent anchor (with Fidelity
    # Preservation) hold the images at the base model's; the paper's caption loss (sum); a discriminator fast enough
    # to keep up (the recipe's 2e-5 is fooled).
    "main": dict(max_train_steps=400, train_batch_size=8, num_inference_steps=20, num_grad_steps=5, seeds=8, learning_rate=1e-3,
                 discriminator_learning_rate=5e-4, caption_loss_reduction="sum", kl_loss_weight=20.0, latent_moment_loss_weight=16.0),
    # The main table until 2026-11-30, which the README's commands of the sessions before ran with (--preset 2026-11).
    "2026-11": dict(max_train_steps=300, train_batch_size=8, num_inference_steps=20, num_grad_steps=2, seeds=8, learning_rate=1e-4,
                    discriminator_learning_rate=5e-4, caption_loss_reduction="sum", kl_loss_weight=0.0, latent_moment_loss_weight=0.0),
    # Every stage and loss term in minutes: the mechanics, not the gain.
    "quick": dict(max_train_steps=2, train_batch_size=2, num_inference_steps=4, num_grad_steps=2, seeds=1, learning_rate=3e-4,
                  discriminator_learning_rate=2e-5, caption_loss_reduction="mean", kl_loss_weight=20.0, latent_moment_loss_weight=16.0),
}
# What else each preset sets: the fine-tunes' captioner (a folder of the world) and the split.
PRESETS = {"main": dict(captioner="blip-mixup", split="balanced"), "2026-11": dict(captioner="blip", split="hash")}
# Prompts a fine-tune may see (never an evaluation prompt): the two-object prompts with a held-out pair in the
# split's fine-tune half, and optionally also the pretraining's two-object prompts, which the base model draws right
# and which anchor the colours of the seen pairs.
FINETUNE_PROMPT_SETS = ("held-out-pairs", "with-seen-pairs")


def finetune_prompts_of(prompt_set, split):
    prompts = world.SPLITS[split][0]
    return prompts + world.PRETRAINING_TWO_OBJECT_PROMPTS if prompt_set == "with-seen-pairs" else prompts


GUIDANCE_SCALE = 7.5
# Fine-tune settings a run may change from the command line (the defaults are the preset's).
TRAINING_FLAGS = ("max_train_steps", "learning_rate", "discriminator_learning_rate", "caption_loss_reduction", "kl_loss_weight",
                  "latent_moment_loss_weight")


def _mean_or_nan(values):
    return float(np.mean(values)) if values else float("nan")


class WorldJudgeScorer:
    """The exact judge of the shapes world behind the evaluation core's scorer interface."""

    name = "shapes-world judge"

    def score(self, images, prompts):
        scores = []
        for image, prompt in zip(images, prompts, strict=True):
            verdict = world.judge(image, prompt)
            objects = verdict["objects"]
            distances = world.palette_distances(image)
            all_shapes_drawn = all(o["shape_present"] for o in objects)
            held_out = [(o.color, o.shape) in world.HELD_OUT for o in world.objects_of(prompt)]
            scores.append({
                "full_prompt_accuracy": float(verdict["full_prompt"]),
                # The same with every object's colour on the palette: a blend the judge reads as right does not count.
                "full_prompt_accuracy_on_palette": float(verdict["full_prompt"] and max(distances, default=0) <= world.ON_PALETTE_DISTANCE),
                "color_accuracy": float(np.mean([o["color_correct"] for o in objects])),
                "shape_accuracy": float(np.mean([o["shape_present"] for o in objects])),
                "missing_object_rate": float(np.mean([not o["shape_present"] for o in objects])),
                "color_leak_rate": float(np.mean([o["color_leak"] for o in objects])),
                # Full-prompt accuracy split into drawing the shapes and binding the colours to them.
                "all_shapes_drawn": float(all_shapes_drawn),
                "colors_right_given_shapes": float(all(o["color_correct"] for o in objects)) if all_shapes_drawn else float("nan"),
                # Binding, or a colour moving from one object to the other: the objects of held-out and of seen pairs.
                "held_out_pair_color_accuracy": _mean_or_nan([o["color_correct"] for o, h in zip(objects, held_out) if h]),
                "seen_pair_color_accuracy": _mean_or_nan([o["color_correct"] for o, h in zip(objects, held_out) if not h]),
                "parsed": float(verdict["parsed"]),
                "background_cleanliness": world.background_cleanliness(image),
                "off_palette_distance": float(np.mean(distances)) if distances else float("nan"),
            })
        return scores


def _downsampled_features(images):
    pixels = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    return torch.nn.functional.interpolate(pixels, size=(8, 8), mode="area").flatten(1).double().numpy()


def _sqrtm_psd(matrix):
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T


def frechet_terms(images, reference_images):
    """The two terms of the Fréchet distance between Gaussian fits of the 8 × 8 × 3 downsampled images of two sets:
    the squared distance of their means (what is drawn on average: colours, positions) and the covariance term
    (how the images vary: variety across seeds)."""
    a, b = _downsampled_features(images), _downsampled_features(reference_images)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_a = _sqrtm_psd(cov_a)
    cross = _sqrtm_psd(root_a @ cov_b @ root_a)
    return float(((a.mean(0) - b.mean(0)) ** 2).sum()), float(np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(cross))


def frechet_distance(images, reference_images):
    """Fréchet distance between Gaussian fits of the 8 × 8 × 3 downsampled images of two sets."""
    return sum(frechet_terms(images, reference_images))


def finetune(name, flags, world_dir, output_dir, settings, threads, captioner=None, checkpointing_steps=None,
             prompts=world.FINETUNE_PROMPTS):
    """One CoMat fine-tune (see :func:`finetunes`); returns its folder."""
    return finetunes({name: flags}, world_dir, output_dir, settings, threads, captioner, checkpointing_steps, prompts)[name]


def finetune_command(flags, world_dir, output_dir, run_dir, prompts_file, settings, captioner, checkpointing_steps):
    """The train_comat.py command of one fine-tune of :func:`finetunes`."""
    regularizers = ["--kl_loss_weight", str(settings["kl_loss_weight"])] if settings["kl_loss_weight"] else []
    if settings["latent_moment_loss_weight"] and "--no_fidelity_preservation" not in flags:
        regularizers += ["--latent_moment_loss_weight", str(settings["latent_moment_loss_weight"])]
    return [
        sys.executable, os.path.join(REPO_ROOT, "train_comat.py"),
        "--pretrained_model_name_or_path", os.path.join(world_dir, "sd"),
        "--caption_model_name_or_path", captioner or os.path.join(world_dir, "blip"),
        "--segmenter", "benchmarks.efficacy.world:load_shape_segmenter",
        "--attention_layers", "mid,up",
        "--train_data", prompts_file, "--output_dir", run_dir,
        "--train_batch_size", str(settings["train_batch_size"]), "--max_train_steps", str(settings["max_train_steps"]),
        "--num_inference_steps", str(settings["num_inference_steps"]), "--num_grad_steps", str(settings["num_grad_steps"]),
        "--guidance_scale", str(GUIDANCE_SCALE), "--learning_rate", str(settings["learning_rate"]),
        "--discriminator_learning_rate", str(settings["discriminator_learning_rate"]),
        "--caption_loss_reduction", settings["caption_loss_reduction"],
        "--rank", "8", "--discriminator_rank", "8", "--checkpointing_steps", str(checkpointing_steps or 100000), "--report_to", "tensorboard",
        "--reference_latents_dir", os.path.join(output_dir, "reference_latents"), *regularizers, "--seed", "0", "--overwrite_output_dir",
        *flags,
    ]


def finetunes(flags_by_name, world_dir, output_dir, settings, threads, captioner=None, checkpointing_steps=None,
              prompts=world.FINETUNE_PROMPTS, concurrent=1):
    """CoMat fine-tunes on ``prompts`` through train_comat.py, ``concurrent`` at a time on ``threads`` threads each;
    returns each run's folder by name. A run whose LoRA exists for the same command and prompts is reused.
    ``captioner`` defaults to the world's; no ``checkpointing_steps``: no checkpoints. The latent anchor is part of
    Fidelity Preservation: a run without it (``--no_fidelity_preservation`` in its flags) has none.

    Runs at once give the LoRAs of runs one at a time bit for bit: each keeps its thread count, and all they share is
    the reference-latent cache, written atomically and seeded per prompt. Their threads wait passively
    (``OMP_WAIT_POLICY``) so that none spins on a core another run needs (spinning makes two at once 14 times slower),
    and each run's output goes to RUN_DIR.log instead of the terminal. A run alone keeps OpenMP's default wait, which
    is 2.3 times faster alone than the passive one: a single pending run, and a last one that would start a wave of
    its own (3 runs, 2 at a time), which waits for the others to end. A failed run stops the experiment after the
    others end (those are reused next time)."""
    prompts_file = os.path.join(output_dir, "finetune_prompts.txt")
    prompts_text = "\n".join(prompts) + "\n"
    prompts_unchanged = os.path.isfile(prompts_file) and open(prompts_file).read() == prompts_text
    run_dirs, pending = {}, []
    for name, flags in flags_by_name.items():
        run_dir = run_dirs[name] = os.path.join(output_dir, "runs", name.replace(" ", "_").replace("+", "plus"))
        command = finetune_command(flags, world_dir, output_dir, run_dir, prompts_file, settings, captioner, checkpointing_steps)
        record = os.path.join(run_dir, "efficacy_command.json")
        if prompts_unchanged and os.path.isfile(record) and json.load(open(record)) == command[1:]:
            logger.info(f"Reusing the fine-tune '{name}' in {run_dir}")
        else:
            pending.append((name, run_dir, command))
    if not pending:
        return run_dirs
    # Longest first (the runs with the most modules on): a run left to a wave of its own is the shortest.
    pending.sort(key=lambda job: sum(flag.startswith("--no_") for flag in job[2]))
    os.makedirs(os.path.join(output_dir, "runs"), exist_ok=True)
    with open(prompts_file, "w") as f:
        f.write(prompts_text)
    env_alone = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1",
                     OMP_NUM_THREADS=str(threads))
    alone = pending[-1:] if len(pending) % concurrent == 1 else []
    together = pending[:len(pending) - len(alone)]
    env_together = dict(env_alone, OMP_WAIT_POLICY="PASSIVE") if concurrent > 1 else env_alone

    def run_one(name, run_dir, command, env):
        logger.info(f"Fine-tuning '{name}': {' '.join(command[1:])}")
        start = time.perf_counter()
        if concurrent > 1:
            with open(run_dir + ".log", "w") as log:
                returncode = subprocess.run(command, env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT).returncode
        else:
            returncode = subprocess.run(command, env=env, cwd=REPO_ROOT).returncode
        if returncode:
            where = f"its output is in {run_dir}.log" if concurrent > 1 else "its error is printed above"
            return f"train_comat.py failed (exit {returncode}) in the fine-tune '{name}'; {where}."
        with open(os.path.join(run_dir, "efficacy_command.json"), "w") as f:
            json.dump(command[1:], f)
        logger.info(f"'{name}' fine-tuned in {time.perf_counter() - start:.0f} s")
        return None

    with concurrent_futures.ThreadPoolExecutor(max_workers=concurrent) as pool:
        failures = [failure for failure in pool.map(lambda job: run_one(*job, env_together), together) if failure]
    failures += [failure for failure in (run_one(*job, env_alone) for job in alone) if failure]
    if failures:
        raise SystemExit("\n".join(failures))
    return run_dirs


def check_train_flags(parser, train_flags):
    """Refuses ``--train_flags`` that cannot be split or that carry a Hub token: the fine-tune's command is logged and
    recorded (train_comat.py refuses the token too, but only after it was printed here)."""
    from utils.hub import SECRET_ARG_NAMES, TOKEN_ON_COMMAND_LINE

    try:
        flags = shlex.split(train_flags)
    except ValueError as error:
        parser.error(f"--train_flags cannot be split into flags ({error}): close its quotes.")
    if any(flag.split("=")[0].lstrip("-") in SECRET_ARG_NAMES for flag in flags):
        parser.error(f"--train_flags: a token {TOKEN_ON_COMMAND_LINE}")


def lora_by_step(run_dir, checkpointing_steps, max_train_steps):
    """A fine-tune's LoRA folders by step: a checkpoint every ``checkpointing_steps`` (if any), then the final LoRA."""
    steps = range(checkpointing_steps, max_train_steps, checkpointing_steps) if checkpointing_steps else []
    return {**{step: os.path.join(run_dir, f"checkpoint-{step}") for step in steps}, max_train_steps: run_dir}


def training_curves(run_dir, window=20):
    """Mean of each logged loss over the first and the last ``window`` steps of a fine-tune (TensorBoard events)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(os.path.join(run_dir, "logs", "comat"))
    accumulator.Reload()
    curves = {}
    for tag in accumulator.Tags()["scalars"]:
        if tag.endswith("loss"):
            values = [event.value for event in accumulator.Scalars(tag)]
            curves[tag] = {"first": float(np.mean(values[:window])), "last": float(np.mean(values[-window:]))}
    return curves


def foreground_rows(images):
    """Per image, the mean row (0 at the top) of its foreground pixels: how high the objects are drawn. Its spread over
    a model's images is the variety of its layouts, which the Fréchet distance's mean term sees and no per-image
    statistic does."""
    rows = np.arange(world.IMAGE_SIZE, dtype=np.float64)[:, None] + 0.5
    centroids = []
    for image in images:
        foreground = world.foreground_mask(image)
        centroids.append(float((rows * foreground).sum() / foreground.sum()) if foreground.any() else float("nan"))
    return np.array(centroids)


def fidelity(generations, prompts, seeds):
    """Per model: Fréchet distance of its images to the world's renders of the same prompts, its two terms, and the
    mean and standard deviation over images of :func:`foreground_rows` (the renders' under ``renders_row_*`` of each)."""
    rng = np.random.default_rng(777)
    real = [world.render(world.objects_of(prompt), rng) for prompt in prompts for _ in seeds]
    real_rows = foreground_rows(real)
    by_model = {}
    for name, generation in generations.items():
        mean_term, covariance_term = frechet_terms(generation.images, real)
        rows = foreground_rows(generation.images)
        by_model[name] = {"frechet_distance": mean_term + covariance_term, "frechet_mean_term": mean_term,
                          "frechet_covariance_term": covariance_term, "row_mean": float(np.nanmean(rows)),
                          "row_sd": float(np.nanstd(rows)), "renders_row_mean": float(real_rows.mean()),
                          "renders_row_sd": float(real_rows.std())}
    return by_model, real


def _percent(entry, sign=""):
    """A summary entry (mean and 95% CI of a share) in percent: "28.8 [23.1, 35.1]"."""
    return f"{100 * entry['mean']:{sign}.1f} [{100 * entry['ci95'][0]:{sign}.1f}, {100 * entry['ci95'][1]:{sign}.1f}]"


def markdown(summary, fidelity_by_model, baseline):
    metrics = ["full_prompt_accuracy", "color_accuracy", "shape_accuracy", "missing_object_rate", "color_leak_rate"]
    lines = ["| model | " + " | ".join(m.replace("_", " ") for m in metrics) + " |", "|---|" + "---:|" * len(metrics)]
    for name, row in summary.items():
        cells = [_percent(row[m]) for m in metrics]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| model | Δ full-prompt accuracy vs base (paired) | parsed by the judge | background cleanliness | Fréchet distance to renders | object colour off the palette (RGB distance) |",
              "|---|---:|---:|---:|---:|---:|"]
    for name, row in summary.items():
        difference = row["full_prompt_accuracy"].get(f"difference_to_{baseline}")
        delta = _percent(difference, "+") if difference else "–"
        off_palette = row.get("off_palette_distance")
        lines.append(f"| {name} | {delta} | {100 * row['parsed']['mean']:.1f}% | {100 * row['background_cleanliness']['mean']:.2f}% | "
                     f"{fidelity_by_model[name]['frechet_distance']:.4f} | "
                     + (f"{off_palette['mean']:.1f} [{off_palette['ci95'][0]:.1f}, {off_palette['ci95'][1]:.1f}] |" if off_palette else "– |"))
    if "frechet_distance_other_seeds" in fidelity_by_model[baseline]:
        lines += ["", f"The {baseline} model on as many other seeds (the Fréchet distance's seed noise): "
                      f"{fidelity_by_model[baseline]['frechet_distance_other_seeds']:.4f}."]
    if "row_mean" in fidelity_by_model[baseline]:
        renders = fidelity_by_model[baseline]
        lines += ["", "How high the objects are drawn (the foreground's mean row, 0 at the top; mean ± SD over images): renders "
                      f"{renders['renders_row_mean']:.1f} ± {renders['renders_row_sd']:.1f}; " + "; ".join(
                          f"{name} {fidelity_by_model[name]['row_mean']:.1f} ± {fidelity_by_model[name]['row_sd']:.1f}"
                          for name in summary) + "."]
    lines += ["", "| model | both shapes drawn | colours right when both shapes are drawn (images) | colour right: objects of held-out pairs | colour right: objects of seen pairs "
                  f"| full prompt, every colour within {world.ON_PALETTE_DISTANCE:.0f} of the palette (Δ paired) |",
              "|---|---:|---:|---:|---:|---:|"]
    for name, row in summary.items():
        cells = [_percent(row["all_shapes_drawn"])]
        binding = row.get("colors_right_given_shapes")
        cells.append(f"{_percent(binding)} ({binding['n']})" if binding else "–")
        cells += [_percent(row[m]) if m in row else "–" for m in ("held_out_pair_color_accuracy", "seen_pair_color_accuracy")]
        on_palette = row.get("full_prompt_accuracy_on_palette", {})
        difference = on_palette.get(f"difference_to_{baseline}")
        cells.append(f"{_percent(on_palette)}" + (f" ({_percent(difference, '+')})" if difference else "") if on_palette else "–")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run(args):
    from diffusers import StableDiffusionPipeline

    recipe = "quick" if args.quick else "full"
    settings = dict(SETTINGS["quick" if args.quick else args.preset])
    settings.update({key: getattr(args, key) for key in TRAINING_FLAGS if getattr(args, key) is not None})
    split = args.split or PRESETS[args.preset]["split"]
    captioner = args.captioner or os.path.join(args.world_dir, PRESETS[args.preset]["captioner"])
    start = time.perf_counter()
    world_summary = build_world(args.world_dir, recipe)
    world_seconds = time.perf_counter() - start
    runs = args.runs.split(",") if args.runs else list(RUNS)
    finetune_prompts = finetune_prompts_of(args.finetune_prompts, split)
    run_dirs = finetunes({name: RUNS[name] + shlex.split(args.train_flags) for name in runs}, args.world_dir, args.output_dir,
                         settings, args.threads, captioner, args.checkpointing_steps, finetune_prompts, args.concurrent_finetunes)
    finetune_seconds = time.perf_counter() - start - world_seconds
    models = {"base": None}
    for name, run_dir in run_dirs.items():  # the run's earlier checkpoints are models of their own
        for step, lora in lora_by_step(run_dir, args.checkpointing_steps, settings["max_train_steps"]).items():
            models[name if step == settings["max_train_steps"] else f"{name} @ {step}"] = lora
    shown_run = "full CoMat" if "full CoMat" in run_dirs else runs[-1]

    pipeline = StableDiffusionPipeline.from_pretrained(os.path.join(args.world_dir, "sd"), safety_checker=None)
    pipeline.set_progress_bar_config(disable=True)
    call = dict(num_inference_steps=settings["num_inference_steps"], guidance_scale=GUIDANCE_SCALE)
    seeds = list(range(settings["seeds"]))
    scorer = WorldJudgeScorer()
    prompts = world.SPLITS[split][1][: 2 if args.quick else None]
    generations = evaluation.generate(pipeline, models, prompts, seeds, **call)
    evaluation.score(generations, scorer)
    summary = evaluation.summarize(generations, baseline="base")
    fidelity_by_model, real = fidelity(generations, prompts, seeds)
    # The Fréchet distance's own noise: the base model on as many other seeds.
    other_seeds = list(range(len(seeds), 2 * len(seeds)))
    base_other_seeds = evaluation.generate(pipeline, {"base": None}, prompts, other_seeds, show_progress=False, **call)["base"]
    fidelity_by_model["base"]["frechet_distance_other_seeds"] = frechet_distance(base_other_seeds.images, real)
    singles = evaluation.generate(pipeline, {"base": None}, [o.phrase for o in world.ALL_OBJECTS], seeds, show_progress=False, **call)
    evaluation.score(singles, scorer)
    single_accuracy = float(np.mean([s["full_prompt_accuracy"] for s in singles["base"].scores]))

    os.makedirs(args.output_dir, exist_ok=True)
    shown = [prompts.index(p) * len(seeds) for p in prompts[:8]]
    evaluation.side_by_side(
        {name: generations[name] for name in ("base", shown_run)}, shown, os.path.join(args.output_dir, "samples.png"),
        caption=lambda name, i: "right" if generations[name].scores[i]["full_prompt_accuracy"] else "wrong",
    )
    failing = next((g_prompt for g_prompt, s in zip(generations["base"].prompts, generations["base"].scores)
                    if not s["full_prompt_accuracy"]), prompts[0])
    subprocess.run([sys.executable, os.path.join(REPO_ROOT, "pipeline_comat.py"), "activations", "--base_model",
                    os.path.join(args.world_dir, "sd"), "--lora", run_dirs[shown_run], "--prompt", failing,
                    "--attention_layers", "mid,up", "--output", os.path.join(args.output_dir, "token_activations.png")],
                   cwd=REPO_ROOT, check=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    finetune_prompt_summary = None
    if args.evaluate_finetune_prompts:
        # In distribution: the two-object prompts the fine-tunes saw, same seeds.
        seen = [prompt for prompt in finetune_prompts if " and " in prompt]
        seen_generations = evaluation.generate(pipeline, models, seen, seeds, **call)
        evaluation.score(seen_generations, scorer)
        finetune_prompt_summary = evaluation.summarize(seen_generations, baseline="base")
    results = dict(
        recipe=recipe, preset=args.preset, settings=settings, train_flags=args.train_flags, captioner=captioner,
        finetune_prompt_summary=finetune_prompt_summary, guidance_scale=GUIDANCE_SCALE, world=world_summary,
        evaluation_prompts=prompts, seeds=seeds, finetune_prompt_set=args.finetune_prompts, split=split,
        finetune_prompts=len(finetune_prompts), base_single_object_accuracy=single_accuracy, summary=summary, fidelity=fidelity_by_model,
        token_activations_prompt=failing,
        training_curves={name: training_curves(run_dir) for name, run_dir in run_dirs.items()},
        seconds=dict(world=world_seconds, finetune=finetune_seconds, total=time.perf_counter() - start),
    )
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    table = markdown(summary, fidelity_by_model, "base")
    if finetune_prompt_summary:
        table += "\nOn the fine-tune prompts (in distribution): " + "; ".join(
            f"{name} {100 * row['full_prompt_accuracy']['mean']:.1f}%"
            + (f" (Δ {_percent(row['full_prompt_accuracy']['difference_to_base'], '+')})" if name != "base" else "")
            + f", parsed {100 * row['parsed']['mean']:.1f}%"
            for name, row in finetune_prompt_summary.items()
        ) + "\n"
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(table)
    print(table)
    print(f"base single-object accuracy {100 * single_accuracy:.1f}%; the captioners prefer the true caption on "
          f"{100 * world_summary['captioner']['prefers_true_caption']:.1f}% (blip) and "
          f"{100 * world_summary['mixup_captioner']['prefers_true_caption']:.1f}% (blip-mixup) of held-out images; {results['seconds']}")
    return results


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world_dir", default="world", help="The world's models (built there when missing).")
    parser.add_argument("--output_dir", default="efficacy-results", help="Fine-tunes, images, results.")
    parser.add_argument("--quick", action="store_true", help="Minutes-long run of every stage: the mechanics, not the gain.")
    parser.add_argument("--preset", choices=[name for name in SETTINGS if name != "quick"], default="main", help="Settings, captioner and split of the fine-tunes (default: main, the README's main table: the mixup captioner, the balanced split, 400 steps, K = 5, lr 1e-3, KL 20, latent anchor 16; 2026-11: the main table until 2026-11-30, which the README's earlier sessions ran with: the world's captioner, the hash split, 300 steps, K = 2, lr 1e-4, neither). The flags below change single settings of it.")
    parser.add_argument("--max_train_steps", type=int, default=None, help="Steps of each fine-tune (default: the preset's, 400).")
    parser.add_argument("--learning_rate", type=float, default=None, help="Generator LoRA learning rate (default: the preset's, 1e-3).")
    parser.add_argument("--discriminator_learning_rate", type=float, default=None, help="Discriminator learning rate (default: 5e-4; the SD1.5 recipe's 2e-5 is fooled here).")
    parser.add_argument("--caption_loss_reduction", choices=["mean", "sum"], default=None, help="train_comat.py's flag (default: sum, the paper's formula).")
    parser.add_argument("--kl_loss_weight", type=float, default=None, help="train_comat.py's flag, for every fine-tune (default: the preset's, 20).")
    parser.add_argument("--latent_moment_loss_weight", type=float, default=None, help="train_comat.py's flag, for the fine-tunes with Fidelity Preservation (default: the preset's, 16).")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")), help="Threads of the fine-tunes.")
    parser.add_argument("--concurrent_finetunes", type=int, default=2, help="Fine-tunes run at once, each on --threads threads: the same LoRAs bit for bit as one at a time, each run's output in RUN_DIR.log; a last run that would start a wave of its own waits for the others and runs alone, without the passive thread wait that keeps runs at once apart and makes a run alone 2.3 times slower (default: 2: on 2 cores 10-14% sooner than 1, and 3 no sooner than 2, README, Performance; 1: one at a time, its progress on the terminal).")
    parser.add_argument("--runs", default=None, help=f"Comma-separated fine-tunes to run (default: all of {', '.join(RUNS)}).")
    parser.add_argument("--captioner", default=None, help="Captioner of the fine-tunes (default: the preset's, WORLD_DIR/blip-mixup), e.g. WORLD_DIR/blip-adversarial-32 from pretrain.py --adversarial_captioner 32.")
    parser.add_argument("--train_flags", default="", help='More train_comat.py flags for every fine-tune, e.g. "--token_loss_weight 1 --pixel_loss_weight 0.05" (default: none; one flag alone: --train_flags=--FLAG).')
    parser.add_argument("--finetune_prompts", choices=FINETUNE_PROMPT_SETS, default="held-out-pairs", help="The fine-tunes' prompts: the split's fine-tune prompts with a held-out pair (default; 28 in the hash split), or those and the 42 two-object prompts of pretraining (with-seen-pairs).")
    parser.add_argument("--split", choices=list(world.SPLITS), default=None, help="Which prompts with a held-out pair are fine-tuned on and which evaluated (default: the preset's, balanced: 27 / 27, each held-out pair in each position about equally often in both; hash: 28 / 26, the split of the results before 2026-11-30).")
    parser.add_argument("--checkpointing_steps", type=int, default=None, help="Also evaluate each run's checkpoint every N steps (default: the final LoRA only).")
    parser.add_argument("--evaluate_finetune_prompts", action="store_true", help="Also measure accuracy on the two-object prompts the fine-tunes saw (in distribution).")
    args = parser.parse_args(argv)
    if args.concurrent_finetunes < 1:
        parser.error(f"--concurrent_finetunes {args.concurrent_finetunes}: at least 1 (one fine-tune at a time).")
    check_train_flags(parser, args.train_flags)
    unknown = [name for name in (args.runs or "").split(",") if name and name not in RUNS]
    if unknown:
        parser.error(f"--runs: no run {', '.join(map(repr, unknown))}; choose from {', '.join(RUNS)}.")
    return args


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(message)s", level=logging.INFO)
    run(args)


if __name__ == "__main__":
    main()
