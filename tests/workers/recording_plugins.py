"""``--segmenter`` and ``--caption_scorer`` factories for the tests: each call adds a line to ``$RECORDING_PLUGIN_LOG``."""

import os

import torch


def _record(line):
    with open(os.environ["RECORDING_PLUGIN_LOG"], "a") as f:
        f.write(line + "\n")


class WholeImageSegmenter:
    def __call__(self, images, queries_per_image):
        _record(f"segmenter {queries_per_image!r}")
        return [torch.ones(len(queries), *images.shape[-2:], device=images.device) for queries in queries_per_image]


class BrightnessScorer:
    """Lower for brighter images: a loss differentiable in the images."""

    def __init__(self, dtype):
        self.dtype = dtype  # the run's weight dtype, as the factory got it

    def to(self, device):
        return self

    def loss(self, images, prompts, reduction="mean", crop_generator=None, max_crop=0):
        _record(f"caption_scorer {list(prompts)!r} {reduction}")
        return 1 - images.float().mean()


class ConstantScorer:
    """A loss that is not connected to the images: training must refuse it."""

    def to(self, device):
        return self

    def loss(self, images, prompts, reduction="mean", crop_generator=None, max_crop=0):
        return torch.tensor(1.0)


def load(args, device):
    return WholeImageSegmenter()


def load_caption_scorer(args, dtype):
    return BrightnessScorer(dtype)


def load_constant_scorer(args, dtype):
    return ConstantScorer()
