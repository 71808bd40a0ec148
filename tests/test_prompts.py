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
