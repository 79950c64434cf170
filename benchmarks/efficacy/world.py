"""The shapes world: scenes, prompts, an exact judge and an exact segmenter.

A scene is a 32 × 32 px image of one or two flat-coloured shapes (circle, square, triangle; red, green, blue,
yellow) on a light background. A two-object scene puts its first object in the left half and its second in the
right half, and its prompt names them in that order: "a red circle and a blue square". Everything is a pure
function of a seed.

The data split makes attribute binding hard for a model pretrained on it, as studies of compositional
generalisation do: the HELD_OUT colour–shape pairs (e.g. a blue circle) appear in pretraining only alone,
never in a two-object scene. Two-object prompts with a held-out pair are split by a fixed hash into the
prompts CoMat may fine-tune on and the prompts it is evaluated on (disjoint).

The judge (:func:`parse_image`) is classical: foreground pixels by their distance to the background colour,
4-connected components, each component's colour = the nearest palette colour of its median pixel, its shape = the
shape whose template drawn in the component's bounding box overlaps it best. :class:`ShapeSegmenter` is the
judge's object finder queried by noun: it stands in for Grounded-SAM through the same segmenter interface.
"""

import hashlib
import itertools
from dataclasses import dataclass

import numpy as np
import torch

IMAGE_SIZE = 32
BACKGROUND = (235, 235, 235)
COLORS = {"red": (215, 35, 35), "green": (30, 160, 60), "blue": (35, 70, 215), "yellow": (235, 195, 20)}
SHAPES = ("circle", "square", "triangle")
# Colour–shape pairs that pretraining shows only alone, never in a two-object scene.
HELD_OUT = frozenset({("red", "square"), ("green", "triangle"), ("blue", "circle"), ("yellow", "circle")})

FOREGROUND_DISTANCE = 60.0  # RGB distance from the background that makes a pixel foreground
MIN_OBJECT_PIXELS = 12
MAX_COLOR_DISTANCE = 110.0  # farther from every palette colour: an unknown colour


@dataclass(frozen=True)
class WorldObject:
    color: str
    shape: str

    @property
    def phrase(self):
        return f"a {self.color} {self.shape}"


def prompt_of(objects):
    return " and ".join(obj.phrase for obj in objects)


def objects_of(prompt):
    """The objects a world prompt names, in order ("a red circle and a blue square")."""
    objects = []
    for phrase in prompt.split(" and "):
        _, color, shape = phrase.split()
        objects.append(WorldObject(color, shape))
    return objects


ALL_OBJECTS = [WorldObject(c, s) for c in COLORS for s in SHAPES]
# Two objects of different shapes (the segmenter, like Grounded-SAM, is queried by noun), ordered left → right.
TWO_OBJECT_PROMPTS = [prompt_of(pair) for pair in itertools.permutations(ALL_OBJECTS, 2) if pair[0].shape != pair[1].shape]


def _prompt_hash(prompt):
    return hashlib.sha256(prompt.encode()).digest()


def _in_evaluation_split(prompt):
    return _prompt_hash(prompt)[0] % 2 == 0


def _held_out_positions(prompt):
    """(colour, shape, position) of each object of ``prompt`` whose pair is held out; empty: none is."""
    return [(obj.color, obj.shape, index) for index, obj in enumerate(objects_of(prompt)) if (obj.color, obj.shape) in HELD_OUT]


def _balanced_split(prompts):
    """(fine-tune, evaluation) halves of ``prompts`` in which each held-out pair appears in each position (left,
    right) about equally often (within 2 for the world's 54 prompts): prompts in hash order, each to the half that
    has seen its held-out pairs in their positions less (the smaller half on a tie)."""
    finetune, evaluation, surplus = [], [], {}  # surplus: evaluation minus fine-tune count per (pair, position)
    for prompt in sorted(prompts, key=_prompt_hash):
        keys = _held_out_positions(prompt)
        balance = sum(surplus.get(key, 0) for key in keys)
        to_evaluation = balance < 0 or (balance == 0 and len(evaluation) <= len(finetune))
        (evaluation if to_evaluation else finetune).append(prompt)
        for key in keys:
            surplus[key] = surplus.get(key, 0) + (1 if to_evaluation else -1)
    order = {prompt: index for index, prompt in enumerate(prompts)}
    return sorted(finetune, key=order.get), sorted(evaluation, key=order.get)


PRETRAINING_TWO_OBJECT_PROMPTS = [p for p in TWO_OBJECT_PROMPTS if not _held_out_positions(p)]
HELD_OUT_PAIR_PROMPTS = [p for p in TWO_OBJECT_PROMPTS if _held_out_positions(p)]
FINETUNE_PROMPTS = [p for p in HELD_OUT_PAIR_PROMPTS if not _in_evaluation_split(p)]
EVALUATION_PROMPTS = [p for p in HELD_OUT_PAIR_PROMPTS if _in_evaluation_split(p)]
# (fine-tune, evaluation) prompts. "hash": the split every result before 2026-11-30 used; by chance it is lopsided
# (a red square on the right in 8 fine-tune prompts and no evaluation prompt). "balanced": each held-out pair in each
# position about equally often in both halves.
SPLITS = {
    "hash": (FINETUNE_PROMPTS, EVALUATION_PROMPTS),
    "balanced": _balanced_split(HELD_OUT_PAIR_PROMPTS),
}


# ---- Rendering -------------------------------------------------------------------------------------------


def _shape_mask(shape, cx, cy, radius, size=IMAGE_SIZE):
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= radius**2
    if shape == "square":
        side = radius * 0.9  # about the circle's area
        return (np.abs(x - cx) <= side) & (np.abs(y - cy) <= side)
    if shape == "triangle":  # pointing up, base at the bottom
        top, bottom = cy - radius * 1.1, cy + radius * 1.1
        half_width = (y - top) / (bottom - top) * radius * 1.2
        return (y >= top) & (y <= bottom) & (np.abs(x - cx) <= half_width)
    raise ValueError(shape)


MIN_RADIUS, MAX_RADIUS = 5.0, 6.0


def _center_ranges(index, count, radius):
    """The ranges (low, high) of the centre x and y the world draws object ``index`` of ``count`` at (one object:
    anywhere; two: the first in the left half, the second in the right)."""
    if count == 1:
        x_range = (radius + 2, IMAGE_SIZE - radius - 2)
    else:
        half = IMAGE_SIZE / 2
        x_range = (index * half + radius + 1.5, (index + 1) * half - radius - 1.5)
    return x_range, (radius + 2.5, IMAGE_SIZE - radius - 2.5)


def draw(objects, layout):
    """An ``[H, W, 3]`` uint8 image of ``objects``, each at its ``(cx, cy, radius)`` of ``layout``."""
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    for obj, (cx, cy, radius) in zip(objects, layout, strict=True):
        image[_shape_mask(obj.shape, cx, cy, radius)] = COLORS[obj.color]
    return image


def random_layout(count, rng):
    """Where the world draws ``count`` objects: a random ``(cx, cy, radius)`` each, as :func:`render` draws them."""
    layout = []
    for index in range(count):
        radius = rng.uniform(MIN_RADIUS, MAX_RADIUS)
        x_range, y_range = _center_ranges(index, count, radius)
        layout.append((rng.uniform(*x_range), rng.uniform(*y_range), radius))
    return layout


def render(objects, rng):
    """An ``[H, W, 3]`` uint8 image of ``objects`` (one anywhere; two: left half, right half)."""
    return draw(objects, random_layout(len(objects), rng))


def _scene(rng, single_object_share, two_object_prompts):
    if rng.random() < single_object_share:
        objects = [ALL_OBJECTS[rng.integers(len(ALL_OBJECTS))]]
    else:
        objects = objects_of(two_object_prompts[rng.integers(len(two_object_prompts))])
    return render(objects, rng), prompt_of(objects)


def pretraining_sample(rng):
    """(image, prompt) of the pretraining data: one object (a third of the scenes) or a two-object scene without a
    held-out pair."""
    return _scene(rng, 1 / 3, PRETRAINING_TWO_OBJECT_PROMPTS)


def captioner_sample(rng):
    """(image, prompt) of the captioner's data: any scene of the world, held-out pairs included."""
    return _scene(rng, 1 / 4, TWO_OBJECT_PROMPTS)


def recolouring(rng):
    """Two colourings of one two-object scene and its layout: (objects A, objects B, layout). B is A's attribute swap
    half the time (when A's two colours differ), else A's shapes in random colours."""
    first, second = objects_of(TWO_OBJECT_PROMPTS[rng.integers(len(TWO_OBJECT_PROMPTS))])
    if rng.random() < 0.5 and first.color != second.color:
        other = [WorldObject(second.color, first.shape), WorldObject(first.color, second.shape)]
    else:
        colors = list(COLORS)
        other = [WorldObject(colors[rng.integers(len(colors))], obj.shape) for obj in (first, second)]
    return [first, second], other, random_layout(2, rng)


def swapped_prompt(prompt):
    """The attribute-swapped caption: "a red circle and a blue square" → "a blue circle and a red square"."""
    first, second = objects_of(prompt)
    return prompt_of([WorldObject(second.color, first.shape), WorldObject(first.color, second.shape)])


# ---- The judge -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Component:
    color: str  # a palette colour, or "unknown"
    shape: str  # a shape, or "unknown"
    pixels: np.ndarray  # [H, W] bool
    center_x: float


def _components(foreground):
    """4-connected components of a small boolean image, as boolean masks."""
    labels = np.zeros(foreground.shape, dtype=np.int32)
    height, width = foreground.shape
    masks = []
    for start in zip(*np.nonzero(foreground)):
        if labels[start]:
            continue
        label = len(masks) + 1
        labels[start] = label
        stack, members = [start], []
        while stack:
            y, x = stack.pop()
            members.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < height and 0 <= nx < width and foreground[ny, nx] and not labels[ny, nx]:
                    labels[ny, nx] = label
                    stack.append((ny, nx))
        mask = np.zeros(foreground.shape, dtype=bool)
        ys, xs = zip(*members)
        mask[list(ys), list(xs)] = True
        masks.append(mask)
    return masks


_PALETTE = np.array(list(COLORS.values()), dtype=np.float32)


def _templates(height, width):
    """Each shape drawn to fill a ``height`` × ``width`` box: an inscribed ellipse, the box, an upward triangle."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    u, v = x / width - 0.5, y / height  # u in [-0.5, 0.5], v in [0, 1] from the top
    return {
        "circle": u**2 + (v - 0.5) ** 2 <= 0.25,
        "square": np.ones((height, width), dtype=bool),
        "triangle": np.abs(u) <= 0.5 * v,
    }


def classify_shape(mask):
    """The shape whose template, drawn in the component's bounding box, overlaps it best (IoU): robust to the blur
    and the grown edges of generated images, where fill ratios are not."""
    ys, xs = np.nonzero(mask)
    box = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    aspect = box.shape[0] / box.shape[1]
    if not 0.6 <= aspect <= 1.7:
        return "unknown"
    overlaps = {shape: (box & template).sum() / (box | template).sum() for shape, template in _templates(*box.shape).items()}
    return max(overlaps, key=overlaps.get)


def distance_to_background(image):
    """``[H, W]``: each pixel's RGB distance from the background colour, for an ``[H, W, 3]`` uint8 image."""
    return np.linalg.norm(image.astype(np.float32) - np.array(BACKGROUND, dtype=np.float32), axis=-1)


def foreground_mask(image):
    """``[H, W]`` bool: the pixels of an ``[H, W, 3]`` uint8 image farther than FOREGROUND_DISTANCE from the background."""
    return distance_to_background(image) > FOREGROUND_DISTANCE


def parse_image(image):
    """The objects of an ``[H, W, 3]`` uint8 image, left to right, each with colour, shape and pixels."""
    pixels = image.astype(np.float32)
    background_distance = distance_to_background(image)
    foreground = background_distance > FOREGROUND_DISTANCE
    found = []
    for mask in _components(foreground):
        if mask.sum() < MIN_OBJECT_PIXELS:
            continue
        median = np.median(pixels[mask], axis=0)
        distances = np.linalg.norm(_PALETTE - median, axis=-1)
        color = list(COLORS)[int(distances.argmin())] if distances.min() <= MAX_COLOR_DISTANCE else "unknown"
        # The shape from the half-contrast contour: blur spreads an edge evenly around it, so it stays in place.
        core = mask & (background_distance >= 0.5 * np.median(background_distance[mask]))
        found.append(Component(color, classify_shape(core if core.sum() >= MIN_OBJECT_PIXELS else mask), mask,
                               float(np.nonzero(mask)[1].mean())))
    return sorted(found, key=lambda component: component.center_x)


def judge(image, prompt):
    """Per-image verdict on a prompt: full match, and per named object whether its shape is there, in its colour,
    or painted in the other object's colour (a leak)."""
    expected = objects_of(prompt)
    found = parse_image(image)
    verdict = {
        "full_prompt": sorted((c.color, c.shape) for c in found) == sorted((o.color, o.shape) for o in expected),
        "parsed": all(c.color != "unknown" and c.shape != "unknown" for c in found),
        "object_count_correct": len(found) == len(expected),
        "objects": [],
    }
    for index, obj in enumerate(expected):
        same_shape = [c for c in found if c.shape == obj.shape]
        other_colors = {o.color for j, o in enumerate(expected) if j != index}
        verdict["objects"].append({
            "shape_present": bool(same_shape),
            "color_correct": any(c.color == obj.color for c in same_shape),
            "color_leak": bool(same_shape) and not any(c.color == obj.color for c in same_shape)
            and any(c.color in other_colors for c in same_shape),
        })
    return verdict


def background_cleanliness(image):
    """Share of the pixels outside every object that are within the foreground distance of the background."""
    distance = distance_to_background(image)
    objects = np.zeros(distance.shape, dtype=bool)
    for component in parse_image(image):
        objects |= component.pixels
    # The rim of an object (antialiasing, VAE blur) is not background noise.
    grown = objects.copy()
    grown[1:] |= objects[:-1]
    grown[:-1] |= objects[1:]
    grown[:, 1:] |= objects[:, :-1]
    grown[:, :-1] |= objects[:, 1:]
    outside = ~grown
    return float((distance[outside] <= 25.0).mean()) if outside.any() else 0.0


# An object whose median colour is farther than this (RGB) from every palette colour is a blend, though the judge reads
# it as the nearest one: a quarter of the way from red to yellow, the closest two; 95% of the base model's objects
# are within it.
ON_PALETTE_DISTANCE = 40.0


def palette_distances(image):
    """Per object of the image, the RGB distance from its median colour to the nearest palette colour: 0 for rendered
    scenes, larger as colours drift between palette colours (an orange that the judge reads as red or yellow)."""
    pixels = image.astype(np.float32)
    return [float(np.linalg.norm(_PALETTE - np.median(pixels[c.pixels], axis=0), axis=-1).min()) for c in parse_image(image)]


# ---- The exact segmenter (stands in for Grounded-SAM) ----------------------------------------------------


class ShapeSegmenter:
    """Masks of each queried shape noun on images in [0, 1]: the judge's components of that shape, OR-ed."""

    def __call__(self, images, queries_per_image):
        from utils.differentiable_sampling import check_unit_range

        check_unit_range(images, "ShapeSegmenter")
        arrays = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        masks = []
        for array, queries in zip(arrays, queries_per_image, strict=True):
            found = parse_image(array)
            image_masks = torch.zeros(len(queries), *array.shape[:2])
            for index, query in enumerate(queries):
                for component in found:
                    if component.shape == query.split()[-1]:
                        image_masks[index] = torch.maximum(image_masks[index], torch.from_numpy(component.pixels).float())
            masks.append(image_masks.to(images.device))
        return masks


def load_shape_segmenter(args, device):
    """The ``--segmenter`` factory of the shapes world (``benchmarks.efficacy.world:load_shape_segmenter``)."""
    return ShapeSegmenter()


# ---- The exact colour reward (a control for the captioner) ---------------------------------------------

MISSING_OBJECT_LOSS = 3.0  # the largest squared RGB distance in [0, 1]: no shape to colour is never better


class ColorOracle:
    """An exact, differentiable Concept Matching scorer for world prompts: per named object, the mean squared RGB
    distance (in [0, 1]) of the pixels of its shape (the :class:`ShapeSegmenter`'s masks, detached) to its colour.

    It knows binding exactly, so a CoMat run with it shows what the training loop does when the reward points the right
    way — the control that separates the loop from the captioner. A named shape that is not drawn costs
    ``MISSING_OBJECT_LOSS`` with no gradient (erasing a wrongly coloured shape must not pay), so this reward cannot add
    missing objects. ``reduction``: "mean" over the batch's objects, "sum" over each image's objects then the mean
    over images. ``crop_generator`` and ``max_crop`` are ignored.
    """

    def __init__(self):
        self.segmenter = ShapeSegmenter()
        self.targets = {name: torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1) / 255 for name, rgb in COLORS.items()}

    def to(self, device):
        return self

    def loss(self, images, prompts, reduction="mean", crop_generator=None, max_crop=0):
        objects = [objects_of(prompt) for prompt in prompts]
        masks = self.segmenter(images, [[obj.shape for obj in image_objects] for image_objects in objects])
        terms = []
        for image, image_objects, image_masks in zip(images.float(), objects, masks, strict=True):
            for obj, mask in zip(image_objects, image_masks, strict=True):
                if mask.sum() == 0:
                    terms.append(image.sum() * 0 + MISSING_OBJECT_LOSS)  # in the graph, without a gradient
                    continue
                distance = ((image - self.targets[obj.color].to(image.device)) ** 2).sum(dim=0)
                terms.append((distance * mask).sum() / mask.sum())
        terms = torch.stack(terms)
        return terms.mean() if reduction == "mean" else terms.sum() / len(prompts)


def load_color_oracle(args, dtype):
    """The ``--caption_scorer`` factory of the exact colour reward (``benchmarks.efficacy.world:load_color_oracle``)."""
    return ColorOracle()


# ---- The exact scene reward (a control with a gradient for every object) -----------------------------------

SCENE_CANDIDATES = 128  # renders per prompt: their layouts cover the positions the world draws at ~1.5 px spacing
# With this weight on the palette prior, an object painted halfway between two palette colours costs as much as the
# swap it replaces (0.1 + 3 × 0.1 against 0.4 per pixel for red and yellow, the closest two): a blend no longer pays.
PALETTE_PRIOR_WEIGHT = 3.0


# Area of each shape drawn at radius r, over r²; and how far below its centre a triangle's centroid lies, over r
# (its width grows linearly from the apex, 1.1 r above the centre, to the base, 1.1 r below).
_AREA_OVER_SQUARED_RADIUS = {"circle": np.pi, "square": 1.8**2, "triangle": 0.5 * 2.2 * 2.4}
_TRIANGLE_CENTROID_BELOW_CENTER = 2 / 3 * 2.2 - 1.1


def layout_of(image, objects):
    """Where ``image`` (``[H, W, 3]`` uint8) draws each of ``objects``: its ``(cx, cy, radius)``, estimated from the
    foreground of its half (one object: of the whole image) as if it were the named shape, within the ranges the world
    draws at. An object with no foreground is placed at the middle of its range."""
    foreground = foreground_mask(image)
    layout = []
    for index, obj in enumerate(objects):
        region = foreground.copy()
        if len(objects) == 2:
            half = IMAGE_SIZE // 2
            region[:, half * (1 - index) : half * (2 - index)] = False
        ys, xs = np.nonzero(region)
        if len(ys) < MIN_OBJECT_PIXELS:
            radius = (MIN_RADIUS + MAX_RADIUS) / 2
            x_range, y_range = _center_ranges(index, len(objects), radius)
            layout.append((sum(x_range) / 2, sum(y_range) / 2, radius))
            continue
        radius = float(np.clip(np.sqrt(len(ys) / _AREA_OVER_SQUARED_RADIUS[obj.shape]), MIN_RADIUS, MAX_RADIUS))
        cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
        if obj.shape == "triangle":
            cy -= _TRIANGLE_CENTROID_BELOW_CENTER * radius
        x_range, y_range = _center_ranges(index, len(objects), radius)
        layout.append((float(np.clip(cx, *x_range)), float(np.clip(cy, *y_range)), radius))
    return layout


class SceneOracle:
    """An exact, differentiable Concept Matching scorer that also creates missing objects: the squared RGB distance
    (in [0, 1], summed over channels and pixels, divided by the render's object pixels) of each image to the
    nearest of ``SCENE_CANDIDATES`` true renders of its prompt. Unlike :class:`ColorOracle`, every pixel of a missing,
    misshapen or wrongly coloured object has a gradient towards the true scene: the densest reward a prompt can give.
    ``reduction`` and the crop arguments are ignored (one term per image, averaged over the batch).

    A squared distance pays for moving a colour part of the way, so a blend of a prompt's two colours on both objects
    is a cheap step down from a swap. ``palette_weight`` > 0 adds, per image, that weight times the mean squared
    distance of the objects' inner pixels to the nearest palette colour (0 on renders): an exact realism term, as a
    discriminator that knew the world's colours would be.

    Nearest of fixed renders is also a pull towards their layouts: what the generator learns from it moves and narrows
    where objects are drawn. ``in_place=True`` compares each image instead with the true scene drawn where the image
    draws its objects (:func:`layout_of`), so the reward asks for the named colours and shapes and nothing about where."""

    def __init__(self, palette_weight=0.0, in_place=False):
        self.candidates = {}
        self.palette_weight = palette_weight
        self.in_place = in_place
        self.palette = torch.from_numpy(_PALETTE / 255).view(-1, 3, 1, 1)

    def to(self, device):
        return self

    def _renders(self, prompt):
        if prompt not in self.candidates:
            seed = int.from_bytes(prompt.encode()[:8].ljust(8, b" "), "little") ^ len(prompt)
            rng = np.random.default_rng(seed)
            self.candidates[prompt] = self._as_pixels(np.stack([render(objects_of(prompt), rng) for _ in range(SCENE_CANDIDATES)]))
        return self.candidates[prompt]

    @staticmethod
    def _as_pixels(renders):
        renders = torch.from_numpy(renders).permute(0, 3, 1, 2).float() / 255
        background = torch.tensor(BACKGROUND, dtype=torch.float32).view(1, 3, 1, 1) / 255
        return renders, ((renders - background).abs().sum(dim=1) > 0).flatten(1).sum(dim=1).float()

    def _render_in_place(self, image, prompt):
        array = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
        objects = objects_of(prompt)
        return self._as_pixels(draw(objects, layout_of(array, objects))[None])

    def loss(self, images, prompts, reduction="mean", crop_generator=None, max_crop=0):
        terms = []
        for image, prompt in zip(images.float(), prompts, strict=True):
            if self.in_place:
                renders, object_pixels = self._render_in_place(image, prompt)
            else:
                renders, object_pixels = self._renders(prompt)
            renders, object_pixels = renders.to(image.device), object_pixels.to(image.device)
            distances = ((image[None] - renders) ** 2).flatten(1).sum(dim=1) / object_pixels
            term = distances.min()
            if self.palette_weight:
                term = term + self.palette_weight * self.off_palette(image)
            terms.append(term)
        return torch.stack(terms).mean()

    def off_palette(self, image):
        """Mean squared RGB distance (in [0, 1]) of the image's inner object pixels to the nearest palette colour: the
        pixels farther than FOREGROUND_DISTANCE from the background whose eight neighbours are too (edges, which the VAE
        blends with the background, are left out)."""
        background = torch.tensor(BACKGROUND, dtype=image.dtype, device=image.device).view(3, 1, 1) / 255
        with torch.no_grad():
            foreground = ((image - background).norm(dim=0) * 255 > FOREGROUND_DISTANCE).float()
            touches_background = torch.nn.functional.max_pool2d((1 - foreground)[None, None], 3, stride=1, padding=1)[0, 0]
            inner = foreground * (1 - touches_background)
        distances = ((image[None] - self.palette.to(image.device, image.dtype)) ** 2).sum(dim=1).min(dim=0).values
        return (distances * inner).sum() / inner.sum().clamp(min=1)


def load_scene_oracle(args, dtype):
    """The ``--caption_scorer`` factory of the exact scene reward (``benchmarks.efficacy.world:load_scene_oracle``)."""
    return SceneOracle()


def load_scene_oracle_in_place(args, dtype):
    """The exact scene reward against the true scene drawn where each image draws its objects
    (``benchmarks.efficacy.world:load_scene_oracle_in_place``)."""
    return SceneOracle(in_place=True)


def load_scene_oracle_on_palette(args, dtype):
    """The exact scene reward with the palette prior at ``PALETTE_PRIOR_WEIGHT``
    (``benchmarks.efficacy.world:load_scene_oracle_on_palette``)."""
    return SceneOracle(palette_weight=PALETTE_PRIOR_WEIGHT)
