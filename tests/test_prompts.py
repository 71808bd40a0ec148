import doctest

import pytest

import doctune.prompts
from doctune.errors import ConfigError
from doctune.prompts import fill, load_prompts


def test_doctests():
    assert doctest.testmod(doctune.prompts).failed == 0


def test_a_seed_generation_config_replaces_the_packaged_template(tmp_path):
    seed = tmp_path / "generation_config.yaml"
    seed.write_text(
        "question_prompt_template: |\n"
        '  Write {num_questions} pairs in {language} as [{{"Question": "...", "Answer": "..."}}].\n'
        "unrelated_key: kept out\n",
        encoding="utf-8",
    )
    prompts = load_prompts("generate", seed)
    text = fill(prompts["question_prompt_template"], num_questions=5, language="Français")
    assert text.strip() == 'Write 5 pairs in Français as [{"Question": "...", "Answer": "..."}].'
    assert "unrelated_key" not in prompts


@pytest.mark.parametrize("content", ["question_prompt_template: [1, 2]\n", "- a list\n", "key: [unclosed\n"])
def test_a_broken_prompt_file_is_one_clean_error(tmp_path, content):
    path = tmp_path / "prompts.yaml"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError):
        load_prompts("generate", path)


@pytest.mark.parametrize(
    ("key", "suggestion"),
    [
        ("question_prompt_templat", "question_prompt_template"),
        ("question_template", "question_prompt_template"),
    ],
)
def test_a_misspelt_template_key_is_an_error_naming_it_and_the_expected_keys(tmp_path, key, suggestion):
    path = tmp_path / "p.yaml"
    path.write_text(f"{key}: Write {{num_questions}} pairs.\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_prompts("generate", path)
    (problem,) = info.value.problems
    assert repr(key) in problem and f"did you mean {suggestion!r}" in problem
    assert "the generate templates are: question_prompt_template" in problem


def test_one_seed_file_for_every_stage_is_accepted(tmp_path):
    """The seed kept every template in one generation_config.yaml: each stage takes its own keys from it."""
    path = tmp_path / "generation_config.yaml"
    path.write_text(
        "question_prompt_template: Q {num_questions}\ncuration_prompt_template: C\njudge_prompt_template: J\n",
        encoding="utf-8",
    )
    assert load_prompts("generate", path)["question_prompt_template"] == "Q {num_questions}"
    assert load_prompts("curate", path)["curation_prompt_template"] == "C"
    assert load_prompts("eval", path)["judge_prompt_template"] == "J"
