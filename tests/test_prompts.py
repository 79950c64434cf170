"""Tests of utils/prompts.py: the built-in prompt set and the ``--train_data`` loaders."""

import hashlib
import json
import os
import re
import subprocess
import sys

import datasets
import pytest
import torch

from utils.prompts import (
    COLORS,
    COUNT_OBJECTS,
    PromptDataset,
    builtin_prompt_categories,
    builtin_prompts,
    collate_prompts,
    load_prompts,
)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Background/abstract nouns that the attribute-concentration loss ignores (comat_method.md, Module 2).
STOP_NOUNS = {
    "scene", "surface", "area", "atmosphere", "noise", "place", "kitchen", "dream", "interior", "exterior",
    "meal", "background", "bathroom", "room", "scent", "street", "hillside", "mountain", "sky", "sea",
    "ocean", "language", "skill", "night", "day", "morning", "space", "environment", "field", "shore",
    "restroom", "party", "grass", "snow", "meadow", "water", "shadow", "waves", "song", "sunlight", "wall",
    "air", "airport", "thing",
}  # fmt: skip

DIGEST_SCRIPT = "import hashlib; from utils.prompts import builtin_prompts; " + (
    "print(hashlib.sha256('\\n'.join(builtin_prompts()).encode()).hexdigest())"
)


def _digest(prompts):
    return hashlib.sha256("\n".join(prompts).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------
# Built-in prompt set
# ----------------------------------------------------------------------------------------------


def test_builtin_prompts_are_identical_in_another_process_with_another_hash_seed():
    hash_seed = "1" if os.environ.get("PYTHONHASHSEED") != "1" else "2"
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    result = subprocess.run(
        [sys.executable, "-c", DIGEST_SCRIPT], cwd=REPO_ROOT, env=env, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == _digest(builtin_prompts())


def test_builtin_prompts_are_many_distinct_and_stable_across_calls():
    prompts = builtin_prompts()
    assert 6000 <= len(prompts) <= 10000
    assert len(set(prompts)) == len(prompts)
    prompts.append("mutating the returned list must not change the built-in set")
    assert builtin_prompts() == prompts[:-1]


def test_categories_are_disjoint_sizeable_and_concatenate_to_the_builtin_set():
    categories = builtin_prompt_categories()
    assert list(categories) == ["color", "shape", "texture", "spatial", "non_spatial", "counting", "complex"]
    for name, prompts in categories.items():
        assert 500 <= len(prompts) <= 2500, name
    assert [prompt for prompts in categories.values() for prompt in prompts] == builtin_prompts()


def test_builtin_prompts_are_lower_case_without_stop_list_nouns_or_stray_whitespace():
    for prompt in builtin_prompts():
        assert prompt == prompt.strip() and "  " not in prompt and prompt == prompt.lower(), prompt
        assert not STOP_NOUNS & set(prompt.split()), prompt


def test_no_prompt_repeats_a_word_other_than_articles_and_numbers():
    # The attention loss drops a noun that occurs twice in a prompt, and distinct attributes keep binding testable.
    repeatable = {"a", "an", "one", "two", "three", "four", "five", "six"}
    for prompt in builtin_prompts():
        words = [word for word in prompt.split() if word not in repeatable]
        assert len(set(words)) == len(words), prompt


def test_indefinite_articles_match_the_next_word():
    for prompt in builtin_prompts():
        for article, word in re.findall(r"\b(an?) (\w+)", prompt):
            assert (article == "an") == (word[0] in "aeiou"), prompt
    prompts = set(builtin_prompts())
    assert {"an old man riding an elephant", "a girl holding an umbrella", "a little boy eating an apple"} <= prompts


def test_counting_prompts_use_correct_plurals():
    counting = set(builtin_prompt_categories()["counting"])
    expected = {
        "two apples", "three knives", "four mice", "five sheep", "two children", "three people", "six geese",
        "two buses", "four boxes", "three strawberries", "five tomatoes", "two teddy bears", "three wolves",
        "two benches",
    }  # fmt: skip
    assert expected <= counting
    wrong = re.compile(r"\b(knifes|mouses|sheeps|childs|mans|womans|persons|gooses|tomatos|strawberrys|buss)\b")
    assert not [prompt for prompt in counting if wrong.search(prompt)]
    # "one" takes the singular noun of the word list; any other number a plural, which differs from it
    # except for the nouns whose plural is the singular.
    counted = re.compile(r"(one|two|three|four|five|six) ([a-z ]+?)(?: and |$)")
    for prompt in counting:
        for number, noun in counted.findall(prompt):
            if number == "one":
                assert noun in COUNT_OBJECTS, prompt
            else:
                assert noun not in COUNT_OBJECTS or noun in {"sheep", "deer", "fish"}, prompt


def test_color_binding_prompts_bind_two_different_colors_to_two_different_objects():
    pattern = re.compile(r"^an? (\w+) (.+) and an? (\w+) (.+)$")
    for prompt in builtin_prompt_categories()["color"]:
        color_a, object_a, color_b, object_b = pattern.match(prompt).groups()
        assert color_a in COLORS and color_b in COLORS and color_a != color_b, prompt
        assert object_a.split()[-1] != object_b.split()[-1], prompt


def test_categories_contain_their_kind_of_prompt():
    categories = builtin_prompt_categories()
    assert "a man riding a horse" in categories["non_spatial"]
    assert any(" on the left of " in prompt for prompt in categories["spatial"])
    assert any(" on top of " in prompt for prompt in categories["spatial"])
    texture_pair = re.compile(r"an? (wooden|metallic) \w+ and an? (leather|glass) \w+")
    assert any(texture_pair.fullmatch(prompt) for prompt in categories["texture"])
    assert any(re.fullmatch(r"an? (round|square|oval) \w+ and an? \w+ \w+", p) for p in categories["shape"])
    assert any(" parked next to " in prompt and " and " in prompt for prompt in categories["complex"])


# ----------------------------------------------------------------------------------------------
# load_prompts
# ----------------------------------------------------------------------------------------------


def test_none_gives_the_builtin_prompts():
    assert load_prompts(None) == builtin_prompts()


def test_txt_file_gives_one_stripped_prompt_per_non_blank_line(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("\ufeffa red book and a yellow vase\n\n   \n  a cat on the left of a dog  \nthree apples", "utf-8")
    assert load_prompts(str(path)) == [
        "a red book and a yellow vase",
        "a cat on the left of a dog",
        "three apples",
    ]


def test_txt_file_rejects_text_column(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a red book\n")
    with pytest.raises(ValueError, match="--text_column"):
        load_prompts(str(path), text_column="prompt")


def test_jsonl_file_reads_the_prompt_field_or_text_column(tmp_path):
    path = tmp_path / "prompts.jsonl"
    records = [{"prompt": " a red book ", "caption": "x"}, {"prompt": "", "caption": "y"}, {"prompt": "a dog"}]
    path.write_text("\n".join(json.dumps(record) for record in records[:2]) + "\n\n" + json.dumps(records[2]))
    assert load_prompts(str(path)) == ["a red book", "a dog"]

    captions = tmp_path / "captions.jsonl"
    captions.write_text(json.dumps({"caption": "a blue car", "id": 1}) + "\n")
    assert load_prompts(str(captions), text_column="caption") == ["a blue car"]


@pytest.mark.parametrize(
    "bad_line, message",
    [
        ("{not json", "invalid JSON"),
        ('["a list"]', "expected a JSON object"),
        ('{"caption": "a dog"}', "--text_column"),
        ('{"prompt": 3}', "not a string"),
    ],
)
def test_jsonl_bad_line_names_file_line_and_fix(tmp_path, bad_line, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "a red book"}) + "\n\n" + bad_line + "\n")
    with pytest.raises(ValueError) as error:
        load_prompts(str(path))
    assert f"--train_data {path}, line 3" in str(error.value)
    assert message in str(error.value)


@pytest.mark.parametrize("name", ["missing.txt", "missing.jsonl"])
def test_missing_prompt_file_raises_file_not_found(tmp_path, name):
    with pytest.raises(FileNotFoundError, match="--train_data .*missing"):
        load_prompts(str(tmp_path / name))


@pytest.mark.parametrize("name, content", [("blank.txt", "\n  \n"), ("blank.jsonl", '{"prompt": "  "}\n\n')])
def test_file_without_prompts_is_an_error(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=f"--train_data {re.escape(str(path))} contains no prompts"):
        load_prompts(str(path))


def test_unsupported_file_type_is_an_error(tmp_path):
    path = tmp_path / "prompts.md"
    path.write_text("a red book\n")
    with pytest.raises(ValueError, match="--train_data .*unsupported type"):
        load_prompts(str(path))


def test_saved_dataset_uses_the_first_default_column_and_skips_empty_values(tmp_path):
    folder = str(tmp_path / "saved")
    columns = {"caption": ["c1", "c2", "c3", "c4"], "prompt": [" a red book ", None, "  ", "a dog"]}
    datasets.Dataset.from_dict({**columns, "id": [1, 2, 3, 4]}).save_to_disk(folder)
    assert load_prompts(folder) == ["a red book", "a dog"]
    assert load_prompts(folder, text_column="caption") == ["c1", "c2", "c3", "c4"]


def test_saved_dataset_dict_uses_the_train_split_or_the_only_split(tmp_path):
    train, test = datasets.Dataset.from_dict({"text": ["train"]}), datasets.Dataset.from_dict({"text": ["test"]})
    datasets.DatasetDict({"test": test, "train": train}).save_to_disk(str(tmp_path / "both"))
    datasets.DatasetDict({"validation": test}).save_to_disk(str(tmp_path / "only"))
    datasets.DatasetDict({"a": train, "b": test}).save_to_disk(str(tmp_path / "ambiguous"))
    assert load_prompts(str(tmp_path / "both")) == ["train"]
    assert load_prompts(str(tmp_path / "only")) == ["test"]
    with pytest.raises(ValueError, match="--train_data .*no 'train' split"):
        load_prompts(str(tmp_path / "ambiguous"))


def test_data_folder_and_single_data_file_load_through_load_dataset(tmp_path):
    folder = tmp_path / "csv_folder"
    folder.mkdir()
    (folder / "data.csv").write_text("id,text\n1,a red book\n2,\n3,a blue car\n")
    cache_dir = str(tmp_path / "cache")
    assert load_prompts(str(folder), cache_dir=cache_dir) == ["a red book", "a blue car"]

    single_file = tmp_path / "prompts.json"
    single_file.write_text(json.dumps({"caption": "a cat near a dog"}) + "\n")
    assert load_prompts(str(single_file), cache_dir=cache_dir) == ["a cat near a dog"]
    assert os.listdir(cache_dir)


def test_dataset_without_a_text_column_lists_columns_and_suggests_text_column(tmp_path):
    folder = str(tmp_path / "saved")
    datasets.Dataset.from_dict({"description": ["a red book"], "id": [1]}).save_to_disk(folder)
    with pytest.raises(ValueError) as error:
        load_prompts(folder)
    assert "--train_data" in str(error.value) and "'description'" in str(error.value)
    assert "--text_column" in str(error.value)
    with pytest.raises(ValueError, match="--text_column 'prompt' is not a column"):
        load_prompts(folder, text_column="prompt")


def test_dataset_column_without_strings_contains_no_prompts(tmp_path):
    folder = str(tmp_path / "saved")
    datasets.Dataset.from_dict({"prompt": [None, None], "id": [1, 2]}).save_to_disk(folder)
    with pytest.raises(ValueError, match="contains no prompts"):
        load_prompts(folder)
    with pytest.raises(ValueError, match="contains no prompts"):
        load_prompts(folder, text_column="id")


def test_unloadable_dataset_name_explains_offline_hub_and_chains_the_cause(tmp_path):
    assert datasets.config.HF_HUB_OFFLINE, "conftest.py sets HF_HUB_OFFLINE=1 before datasets is imported"
    with pytest.raises(ValueError) as error:
        load_prompts("comat-tests/no-such-dataset", cache_dir=str(tmp_path / "cache"))
    message = str(error.value)
    assert "--train_data comat-tests/no-such-dataset could not be found as a file or loaded as a dataset" in message
    assert "HF_HUB_OFFLINE" in message
    assert error.value.__cause__ is not None


# ----------------------------------------------------------------------------------------------
# PromptDataset / collate_prompts
# ----------------------------------------------------------------------------------------------


def test_prompt_dataset_batches_are_lists_of_prompt_strings():
    prompts = ["a red book", "a blue car", "two cats"]
    dataset = PromptDataset(prompts)
    assert len(dataset) == 3 and dataset[1] == "a blue car"
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collate_prompts)
    assert list(loader) == [["a red book", "a blue car"], ["two cats"]]
