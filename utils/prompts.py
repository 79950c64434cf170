"""Training prompts for CoMat: a built-in compositional prompt set and loaders for user prompt files and datasets.

CoMat trains on text prompts only (no images): the model samples its own images online and is scored
on how well they match the prompt. The paper used ~20K prompts from the T2I-CompBench train split,
HRS-Bench and ABC-6K, none of which can be downloaded here, so :func:`builtin_prompts` generates a
compositional set in the spirit of T2I-CompBench from templates and word lists: colour, shape and
texture binding, spatial and non-spatial relations, counting, and mixed prompts.

The word lists hold only concrete nouns that an open-vocabulary detector (GroundingDINO) can find,
none of the background nouns that the attribute-concentration loss ignores (sky, grass, room, ...),
and no prompt names the same head noun twice, because that loss drops repeated nouns. Sampling uses
fixed ``random.Random`` seeds and tuples, so the set is the same, in the same order, in every process.

:func:`load_prompts` is what the training scripts' ``--train_data`` / ``--text_column`` flags call.
"""

import json
import os
import random
from functools import lru_cache
from typing import Callable, Optional, Sequence

import datasets
import torch

# ----------------------------------------------------------------------------------------------
# Word lists. Tuples, not sets: their order fixes the order of the generated prompts.
# ----------------------------------------------------------------------------------------------

COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "gray")

COLOR_OBJECTS = (
    "book", "vase", "car", "bench", "bowl", "chair", "cup", "umbrella", "backpack", "bicycle", "bird",
    "cat", "dog", "horse", "suitcase", "clock", "kite", "balloon", "hat", "shoe", "boat", "bus", "train",
    "truck", "motorcycle", "airplane", "teddy bear", "sofa", "bed", "mug", "pillow", "lamp", "guitar",
    "scarf", "shirt", "jacket", "dress", "handbag", "door", "tulip", "butterfly", "towel", "candle",
    "bottle", "plate", "toothbrush", "sheep", "cow",
)  # fmt: skip

SHAPES = (
    "round", "square", "rectangular", "triangular", "oval", "circular", "hexagonal", "octagonal",
    "cylindrical", "spherical",
)  # fmt: skip

SHAPE_OBJECTS = (
    "clock", "mirror", "table", "plate", "box", "pillow", "rug", "window", "cake", "sign", "bowl", "vase",
    "cookie", "tray", "tent", "kite", "cushion", "lamp", "candle", "basket", "bottle", "stool",
    "sandwich", "pizza", "watch", "balloon", "building",
)  # fmt: skip

# Material adjective -> objects it plausibly describes.
TEXTURE_OBJECTS = {
    "wooden": ("chair", "table", "spoon", "box", "bench", "door", "boat", "bowl", "cabinet", "ladder", "fence"),
    "metallic": ("lamp", "chair", "bucket", "bench", "spoon", "box", "robot", "car", "bowl", "helmet", "kettle"),
    "glass": ("bottle", "vase", "cup", "bowl", "jar", "table", "teapot", "door"),
    "leather": ("bag", "jacket", "boot", "sofa", "chair", "belt", "wallet", "glove", "suitcase"),
    "plastic": ("bottle", "cup", "chair", "bag", "bucket", "bowl", "box", "spoon", "toy"),
    "fluffy": ("pillow", "towel", "cat", "dog", "rug", "blanket", "teddy bear", "sheep"),
    "rubber": ("ball", "boot", "duck", "glove", "tire", "mat"),
    "ceramic": ("vase", "mug", "bowl", "plate", "teapot", "jar"),
    "stone": ("bench", "statue", "bridge", "house", "vase", "tower"),
    "marble": ("statue", "table", "column", "vase", "fountain"),
    "velvet": ("sofa", "dress", "curtain", "pillow", "chair"),
    "woolen": ("sweater", "hat", "scarf", "blanket", "sock", "glove"),
    "furry": ("cat", "dog", "rabbit", "hat", "coat", "slipper"),
    "porcelain": ("vase", "cup", "plate", "teapot", "doll", "bowl"),
    "silk": ("dress", "scarf", "tie", "shirt", "robe", "pillow"),
    "paper": ("bag", "cup", "lantern", "box"),
    "knitted": ("sweater", "hat", "scarf", "blanket", "sock"),
}

SPATIAL_RELATIONS = (
    "on the left of", "on the right of", "next to", "near", "beside", "in front of", "behind", "above",
    "below",
)  # fmt: skip

SPATIAL_OBJECTS = (
    "cat", "dog", "horse", "cow", "sheep", "bird", "elephant", "giraffe", "zebra", "bear", "rabbit", "duck",
    "man", "woman", "boy", "girl", "car", "bus", "bicycle", "motorcycle", "truck", "train", "boat",
    "airplane", "bench", "chair", "table", "lamp", "vase", "clock", "suitcase", "backpack", "umbrella",
    "television", "laptop", "refrigerator", "sofa", "bed", "fire hydrant", "traffic light", "mailbox",
    "kite", "ball", "tree", "house",
)  # fmt: skip

# "X on top of Y" / "X under Y": things that sit on (or under) a supporting piece of furniture or object.
SUPPORT_RELATIONS = ("on top of", "under")
SUPPORTED_OBJECTS = (
    "cat", "dog", "book", "cup", "vase", "lamp", "laptop", "bird", "clock", "teddy bear", "bottle", "bowl",
    "potted plant", "apple", "basket",
)  # fmt: skip
SUPPORTS = ("table", "desk", "chair", "bed", "sofa", "shelf", "box", "car", "bench", "suitcase", "piano", "stool")

HUMAN_SUBJECTS = (
    "man", "woman", "boy", "girl", "child", "old man", "old woman", "young woman", "little girl", "little boy",
)  # fmt: skip

# Verb -> objects a person plausibly does it to.
HUMAN_ACTIONS = {
    "riding": ("horse", "bicycle", "motorcycle", "elephant", "skateboard", "camel", "scooter"),
    "holding": (
        "umbrella", "cup", "book", "phone", "balloon", "candle", "lantern", "teddy bear", "guitar", "baby",
        "puppy", "apple", "bottle", "flower",
    ),  # fmt: skip
    "carrying": ("suitcase", "backpack", "box", "basket", "ladder", "surfboard", "bucket"),
    "feeding": ("horse", "dog", "cat", "bird", "giraffe", "goat", "duck", "cow", "rabbit"),
    "walking": ("dog",),
    "playing": ("guitar", "piano", "violin", "drum", "trumpet", "flute", "cello"),
    "reading": ("book", "newspaper", "magazine", "map", "letter"),
    "eating": ("apple", "banana", "sandwich", "pizza", "donut", "cake", "carrot"),
    "drinking from": ("cup", "bottle", "mug"),
    "throwing": ("frisbee", "ball"),
    "kicking": ("ball",),
    "hugging": ("dog", "cat", "teddy bear", "tree", "horse"),
    "pushing": ("stroller", "cart", "wheelbarrow", "bicycle"),
    "pulling": ("wagon", "suitcase", "sled"),
    "flying": ("kite",),
    "wearing": ("hat", "backpack", "scarf", "helmet", "crown", "tie"),
    "looking at": ("painting", "map", "clock", "mirror", "laptop"),
    "using": ("laptop", "computer", "phone", "camera"),
    "cutting": ("cake", "pizza", "apple", "bread"),
    "washing": ("car", "dog", "plate"),
}

ANIMAL_ACTIONS = (
    ("dog", "chasing", ("cat", "ball", "duck", "bird", "squirrel")),
    ("dog", "catching", ("frisbee", "ball")),
    ("dog", "carrying", ("stick", "bone", "newspaper", "shoe")),
    ("dog", "chewing", ("shoe", "bone")),
    ("cat", "chasing", ("mouse", "bird", "butterfly", "ball")),
    ("cat", "drinking from", ("bowl", "cup")),
    ("cat", "watching", ("bird", "goldfish")),
    ("horse", "pulling", ("cart", "carriage", "wagon")),
    ("elephant", "carrying", ("log", "man")),
)

NUMBERS = ("one", "two", "three", "four", "five", "six")

COUNT_OBJECTS = (
    "apple", "orange", "banana", "lemon", "tomato", "potato", "strawberry", "cherry", "peach", "egg", "cup",
    "book", "chair", "car", "bus", "bicycle", "balloon", "bottle", "candle", "plate", "bowl", "spoon",
    "fork", "knife", "key", "pencil", "box", "bench", "watch", "cat", "dog", "bird", "horse", "cow", "sheep",
    "deer", "fish", "duck", "goose", "mouse", "wolf", "fox", "butterfly", "puppy", "man", "woman", "child",
    "person", "boy", "girl", "umbrella", "teddy bear", "donut", "cookie", "cupcake", "pumpkin", "flower",
    "tree", "leaf", "toothbrush", "dress",
)  # fmt: skip

IRREGULAR_PLURALS = {
    "man": "men", "woman": "women", "child": "children", "person": "people", "mouse": "mice",
    "goose": "geese", "sheep": "sheep", "deer": "deer", "fish": "fish", "knife": "knives", "wolf": "wolves",
    "leaf": "leaves", "tomato": "tomatoes", "potato": "potatoes",
}  # fmt: skip

# Mixed prompts: vehicles parked by a building and an outdoor object, people dressed in a coloured garment.
VEHICLES = ("car", "bus", "truck", "bicycle", "motorcycle", "van", "scooter")
PARKING_RELATIONS = ("parked next to", "parked in front of", "parked behind")
BUILDINGS = ("house", "barn", "church", "shop", "cabin", "garage", "lighthouse")
OUTDOOR_OBJECTS = ("tree", "fence", "mailbox", "bench", "fire hydrant", "lamppost", "flower pot", "dog", "horse")
GARMENTS = ("shirt", "jacket", "dress", "hat", "coat", "scarf", "sweater", "skirt")
# Furniture that a shape word describes well ("a round table"), with the shapes that fit furniture.
SHAPED_SUPPORTS = ("table", "desk", "stool", "box", "shelf", "bench", "tray")
FLAT_SHAPES = ("round", "square", "rectangular", "triangular", "oval", "hexagonal", "octagonal")

# Prompts drawn per category; the non-spatial set and the single-object counting prompts are
# enumerated in full instead. Seeds are fixed integers so that no hash randomisation can leak in.
_CATEGORY_SEEDS = {"color": 1, "shape": 2, "texture": 3, "spatial": 4, "counting": 6, "complex": 7}
_COLOR_COUNT = 1500
_SHAPE_COUNT = 1200
_TEXTURE_COUNT = 1200
_SPATIAL_COUNT = 1200
_SUPPORT_COUNT = 300
_COUNTING_PAIR_COUNT = 1000
_COMPLEX_COUNT_PER_TEMPLATE = 300


def _with_article(phrase: str) -> str:
    # The word lists avoid vowel letters with a consonant sound ("unicorn") and silent h ("hour").
    article = "an" if phrase[0] in "aeiou" else "a"
    return f"{article} {phrase}"


def _plural(noun: str) -> str:
    """English plural of a (possibly compound) noun: only the head word is inflected ("teddy bears")."""
    *modifiers, head = noun.split(" ")
    if head in IRREGULAR_PLURALS:
        head = IRREGULAR_PLURALS[head]
    elif head.endswith(("s", "x", "z", "ch", "sh")):
        head += "es"
    elif head.endswith("y") and head[-2] not in "aeiou":
        head = head[:-1] + "ies"
    else:
        head += "s"
    return " ".join([*modifiers, head])


def _counted(number: str, noun: str) -> str:
    return f"{number} {noun if number == 'one' else _plural(noun)}"


def _heads_distinct(*nouns: str) -> bool:
    # The attention loss drops a noun that occurs twice in a prompt, so each object must have its own head noun.
    heads = [noun.split(" ")[-1] for noun in nouns]
    return len(set(heads)) == len(heads)


def _sample_unique(
    seed: int, count: int, draw: Callable[[random.Random], Optional[str]], exclude: frozenset = frozenset()
) -> list[str]:
    """``count`` distinct prompts from ``draw`` (which returns None for a rejected draw), in draw order, none of
    them in ``exclude``."""
    rng = random.Random(seed)
    prompts = {}
    for _ in range(100 * count):
        prompt = draw(rng)
        if prompt is not None and prompt not in exclude:
            prompts.setdefault(prompt)
            if len(prompts) == count:
                return list(prompts)
    raise RuntimeError(f"Could only draw {len(prompts)} of {count} distinct prompts: the word lists are too small.")


def _draw_color(rng):
    (color_a, color_b), (object_a, object_b) = rng.sample(COLORS, 2), rng.sample(COLOR_OBJECTS, 2)
    if not _heads_distinct(object_a, object_b):
        return None
    return f"{_with_article(f'{color_a} {object_a}')} and {_with_article(f'{color_b} {object_b}')}"


def _draw_shape(rng):
    (shape_a, shape_b), (object_a, object_b) = rng.sample(SHAPES, 2), rng.sample(SHAPE_OBJECTS, 2)
    return f"{_with_article(f'{shape_a} {object_a}')} and {_with_article(f'{shape_b} {object_b}')}"


_MATERIALS = tuple(TEXTURE_OBJECTS)


def _texture_phrase(rng: random.Random) -> tuple[str, str]:
    material = rng.choice(_MATERIALS)
    return material, rng.choice(TEXTURE_OBJECTS[material])


def _draw_texture(rng):
    (material_a, object_a), (material_b, object_b) = _texture_phrase(rng), _texture_phrase(rng)
    if material_a == material_b or not _heads_distinct(object_a, object_b):
        return None
    return f"{_with_article(f'{material_a} {object_a}')} and {_with_article(f'{material_b} {object_b}')}"


def _spatial_draw(relations):
    def draw(rng):
        object_a, object_b = rng.sample(SPATIAL_OBJECTS, 2)
        if not _heads_distinct(object_a, object_b):
            return None
        return f"{_with_article(object_a)} {rng.choice(relations)} {_with_article(object_b)}"

    return draw


def _draw_support(rng):
    thing, support = rng.choice(SUPPORTED_OBJECTS), rng.choice(SUPPORTS)
    return f"{_with_article(thing)} {rng.choice(SUPPORT_RELATIONS)} {_with_article(support)}"


def _color_prompts() -> list[str]:
    return _sample_unique(_CATEGORY_SEEDS["color"], _COLOR_COUNT, _draw_color)


def _shape_prompts() -> list[str]:
    return _sample_unique(_CATEGORY_SEEDS["shape"], _SHAPE_COUNT, _draw_shape)


def _texture_prompts() -> list[str]:
    return _sample_unique(_CATEGORY_SEEDS["texture"], _TEXTURE_COUNT, _draw_texture)


def _spatial_prompts() -> list[str]:
    seed = _CATEGORY_SEEDS["spatial"]
    prompts = _sample_unique(seed, _SPATIAL_COUNT, _spatial_draw(SPATIAL_RELATIONS))
    # A distinct seed for the second draw, so the two sub-samples are not correlated.
    return prompts + _sample_unique(seed + 100, _SUPPORT_COUNT, _draw_support)


def _non_spatial_prompts() -> list[str]:
    prompts = [
        f"{_with_article(subject)} {verb} {_with_article(thing)}"
        for subject in HUMAN_SUBJECTS
        for verb, things in HUMAN_ACTIONS.items()
        for thing in things
    ]
    prompts += [
        f"{_with_article(animal)} {verb} {_with_article(thing)}"
        for animal, verb, things in ANIMAL_ACTIONS
        for thing in things
    ]
    return prompts


def _counting_prompts() -> list[str]:
    singles = [_counted(number, noun) for number in NUMBERS[1:] for noun in COUNT_OBJECTS]

    def draw_pair(rng):
        (noun_a, noun_b), number_a, number_b = rng.sample(COUNT_OBJECTS, 2), rng.choice(NUMBERS), rng.choice(NUMBERS)
        if not _heads_distinct(noun_a, noun_b):
            return None
        return f"{_counted(number_a, noun_a)} and {_counted(number_b, noun_b)}"

    return singles + _sample_unique(_CATEGORY_SEEDS["counting"], _COUNTING_PAIR_COUNT, draw_pair)


# Mixed prompts colour every object, so they draw only objects that a colour word can describe.
_COLORABLE_COUNT_OBJECTS = tuple(noun for noun in COUNT_OBJECTS if noun in COLOR_OBJECTS)
_COLORABLE_HUMAN_ACTIONS = tuple(
    (verb, thing)
    for verb, things in HUMAN_ACTIONS.items()
    if verb != "wearing"  # the subject already wears the coloured garment
    for thing in things
    if thing in COLOR_OBJECTS
)


# Mixed prompts give their objects distinct colours, so that a swapped binding is a visible mistake.
def _draw_parked_vehicle(rng):
    # "a blue car parked next to a white house and a green tree"
    vehicle, building, thing = rng.choice(VEHICLES), rng.choice(BUILDINGS), rng.choice(OUTDOOR_OBJECTS)
    if not _heads_distinct(vehicle, building, thing):
        return None
    relation = rng.choice(PARKING_RELATIONS)
    color_a, color_b, color_c = rng.sample(COLORS, 3)
    return (
        f"{_with_article(f'{color_a} {vehicle}')} {relation} {_with_article(f'{color_b} {building}')} "
        f"and {_with_article(f'{color_c} {thing}')}"
    )


def _draw_still_life(rng):
    # "a red cup and a glass vase on top of a round table"
    thing, color = rng.choice(SUPPORTED_OBJECTS), rng.choice(COLORS)
    material, textured = _texture_phrase(rng)
    shape, support = rng.choice(FLAT_SHAPES), rng.choice(SHAPED_SUPPORTS)
    if not _heads_distinct(thing, textured, support):
        return None
    return (
        f"{_with_article(f'{color} {thing}')} and {_with_article(f'{material} {textured}')} "
        f"{rng.choice(SUPPORT_RELATIONS)} {_with_article(f'{shape} {support}')}"
    )


def _draw_counted_colored(rng):
    # "three black cats on the left of a red sofa"
    noun, other = rng.choice(_COLORABLE_COUNT_OBJECTS), rng.choice(COLOR_OBJECTS)
    if not _heads_distinct(noun, other):
        return None
    number, relation = rng.choice(NUMBERS[1:]), rng.choice(SPATIAL_RELATIONS)
    color_a, color_b = rng.sample(COLORS, 2)
    return f"{number} {color_a} {_plural(noun)} {relation} {_with_article(f'{color_b} {other}')}"


def _draw_dressed_person(rng):
    # "a man in a red jacket riding a white horse"
    subject, garment = rng.choice(HUMAN_SUBJECTS), rng.choice(GARMENTS)
    verb, thing = rng.choice(_COLORABLE_HUMAN_ACTIONS)
    if not _heads_distinct(subject, garment, thing):
        return None
    color_a, color_b = rng.sample(COLORS, 2)
    return (
        f"{_with_article(subject)} in {_with_article(f'{color_a} {garment}')} {verb} "
        f"{_with_article(f'{color_b} {thing}')}"
    )


COMPLEX_DRAWS = (_draw_parked_vehicle, _draw_still_life, _draw_counted_colored, _draw_dressed_person)


def _complex_prompts() -> list[str]:
    seed = _CATEGORY_SEEDS["complex"]
    prompts = []
    for offset, draw in enumerate(COMPLEX_DRAWS):
        prompts += _sample_unique(seed + 100 * offset, _COMPLEX_COUNT_PER_TEMPLATE, draw)
    return prompts


@lru_cache(maxsize=1)
def _builtin_categories() -> tuple[tuple[str, tuple[str, ...]], ...]:
    return (
        ("color", tuple(_color_prompts())),
        ("shape", tuple(_shape_prompts())),
        ("texture", tuple(_texture_prompts())),
        ("spatial", tuple(_spatial_prompts())),
        ("non_spatial", tuple(_non_spatial_prompts())),
        ("counting", tuple(_counting_prompts())),
        ("complex", tuple(_complex_prompts())),
    )


def builtin_prompt_categories() -> dict[str, list[str]]:
    """The built-in prompts by category (color, shape, texture, spatial, non_spatial, counting, complex).

    Categories are disjoint; concatenated in this order they give :func:`builtin_prompts`.
    """
    return {name: list(prompts) for name, prompts in _builtin_categories()}


def builtin_prompts() -> list[str]:
    """The built-in compositional prompt set (~8.9K distinct prompts), identical in every call and process."""
    return [prompt for _, prompts in _builtin_categories() for prompt in prompts]


# ----------------------------------------------------------------------------------------------
# --train_data loading
# ----------------------------------------------------------------------------------------------

DEFAULT_TEXT_COLUMNS = ("prompt", "text", "caption")
# Single data files that ``datasets`` reads through a packaged builder.
_DATASET_FILE_BUILDERS = {".csv": "csv", ".json": "json", ".parquet": "parquet"}
_ACCEPTED_INPUTS = (
    "Pass a .txt file (one prompt per line), a .jsonl file with a \"prompt\" field, a .csv/.json/.parquet "
    "file, a dataset folder or a Hugging Face dataset name, or leave --train_data unset to train on the "
    "built-in prompts."
)


def load_prompts(
    train_data: Optional[str], text_column: Optional[str] = None, cache_dir: Optional[str] = None
) -> list[str]:
    """Read the training prompts named by ``--train_data``.

    Args:
        train_data: None for :func:`builtin_prompts`; a ``.txt`` file (one prompt per line, blank lines
            skipped); a ``.jsonl`` file (one JSON object per line, prompt in ``"prompt"`` or ``text_column``);
            a ``.csv``/``.json``/``.parquet`` file; a folder written by ``save_to_disk``; or anything
            ``datasets.load_dataset`` accepts (a data folder, a Hub dataset name). Of a dataset, the
            "train" split (or the only one) is used.
        text_column: the JSONL field or dataset column holding the prompts. Default for datasets: the
            first of "prompt", "text", "caption".
        cache_dir: ``datasets`` cache folder.

    Returns:
        The prompts, stripped, in file order; empty and non-string dataset values are skipped.
    """
    if train_data is None:
        return builtin_prompts()
    path = os.path.expanduser(train_data)
    suffix = os.path.splitext(path)[1].lower()
    if suffix in (".txt", ".jsonl"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--train_data {train_data}: no such file. {_ACCEPTED_INPUTS}")
        if suffix == ".txt":
            if text_column is not None:
                raise ValueError(
                    f"--text_column {text_column!r} was given, but --train_data {train_data} is a .txt file, "
                    "which holds one prompt per line and has no columns. Drop --text_column."
                )
            prompts = [line.strip() for line in _read_lines(path, train_data) if line.strip()]
        else:
            prompts = _read_jsonl(path, train_data, text_column)
    elif os.path.isfile(path) and suffix not in _DATASET_FILE_BUILDERS:
        raise ValueError(
            f"--train_data {train_data} is a file of an unsupported type ({suffix or 'no suffix'}). {_ACCEPTED_INPUTS}"
        )
    else:
        prompts = _column_prompts(_load_train_split(train_data, path, cache_dir), train_data, text_column)
    if not prompts:
        raise ValueError(f"--train_data {train_data} contains no prompts. {_ACCEPTED_INPUTS}")
    return prompts


def _read_lines(path: str, train_data: str) -> list[str]:
    try:
        # utf-8-sig: a byte-order mark written by some editors must not become part of the first prompt.
        with open(path, encoding="utf-8-sig") as file:
            return file.readlines()
    except UnicodeDecodeError as error:
        raise ValueError(f"--train_data {train_data} is not UTF-8 text ({error}). Save it as UTF-8.") from error


def _read_jsonl(path: str, train_data: str, text_column: Optional[str]) -> list[str]:
    field = text_column or DEFAULT_TEXT_COLUMNS[0]
    prompts = []
    for line_number, line in enumerate(_read_lines(path, train_data), start=1):
        if not line.strip():
            continue
        where = f"--train_data {train_data}, line {line_number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{where}: invalid JSON ({error.msg}). Each non-blank line of a .jsonl file must be one JSON "
                f'object, e.g. {{"{field}": "a red book and a yellow vase"}}.'
            ) from error
        if not isinstance(record, dict):
            raise ValueError(
                f"{where}: expected a JSON object, got {type(record).__name__}. Each non-blank line of a .jsonl "
                f'file must be one JSON object, e.g. {{"{field}": "a red book and a yellow vase"}}.'
            )
        if field not in record:
            raise ValueError(
                f"{where}: no {field!r} field (fields: {sorted(record)}). Pass the field that holds the "
                "prompt with --text_column."
            )
        value = record[field]
        if not isinstance(value, str):
            raise ValueError(
                f"{where}: field {field!r} is a {type(value).__name__}, not a string. Pass the field that "
                "holds the prompt with --text_column."
            )
        if value.strip():
            prompts.append(value.strip())
    return prompts


def _load_train_split(train_data: str, path: str, cache_dir: Optional[str]) -> datasets.Dataset:
    is_saved_dataset = any(os.path.isfile(os.path.join(path, name)) for name in ("state.json", "dataset_dict.json"))
    try:
        if os.path.isdir(path) and is_saved_dataset:
            # ``load_dataset`` refuses folders written by ``save_to_disk``.
            loaded = datasets.load_from_disk(path)
        elif os.path.isfile(path):
            builder = _DATASET_FILE_BUILDERS[os.path.splitext(path)[1].lower()]
            loaded = datasets.load_dataset(builder, data_files=path, cache_dir=cache_dir)
        else:
            loaded = datasets.load_dataset(train_data, cache_dir=cache_dir)
    except (OSError, ValueError, datasets.exceptions.DatasetsError) as error:
        offline_hint = ""
        if datasets.config.HF_HUB_OFFLINE:
            offline_hint = (
                " HF_HUB_OFFLINE is set, so the Hugging Face Hub is unreachable: download the dataset where "
                "the Hub is reachable and pass its local folder."
            )
        raise ValueError(
            f"--train_data {train_data} could not be found as a file or loaded as a dataset "
            f"({type(error).__name__}: {error}).{offline_hint} {_ACCEPTED_INPUTS}"
        ) from error

    if isinstance(loaded, datasets.Dataset):
        return loaded
    if "train" in loaded:
        return loaded["train"]
    if len(loaded) == 1:
        return next(iter(loaded.values()))
    raise ValueError(
        f"--train_data {train_data} has the splits {sorted(loaded)} but no 'train' split. Save the split to "
        "train on as 'train' (or alone) and pass that folder."
    )


def _column_prompts(dataset: datasets.Dataset, train_data: str, text_column: Optional[str]) -> list[str]:
    columns = dataset.column_names
    if text_column is not None:
        if text_column not in columns:
            raise ValueError(
                f"--text_column {text_column!r} is not a column of --train_data {train_data}; its columns are "
                f"{columns}. Pass one of them with --text_column."
            )
        column = text_column
    else:
        column = next((name for name in DEFAULT_TEXT_COLUMNS if name in columns), None)
        if column is None:
            raise ValueError(
                f"--train_data {train_data} has none of the columns {list(DEFAULT_TEXT_COLUMNS)}; its columns "
                f"are {columns}. Pass the column that holds the prompts with --text_column."
            )
    return [value.strip() for value in dataset[column] if isinstance(value, str) and value.strip()]


class PromptDataset(torch.utils.data.Dataset):
    """A map-style dataset whose items are the prompt strings themselves: CoMat trains without images."""

    def __init__(self, prompts: Sequence[str]):
        self.prompts = list(prompts)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, index: int) -> str:
        return self.prompts[index]


def collate_prompts(batch: Sequence[str]) -> list[str]:
    """``collate_fn`` for :class:`PromptDataset`: a batch is the list of its prompts, tokenized later."""
    return list(batch)
