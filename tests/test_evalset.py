import json

import pytest

from doctune.errors import InputError
from doctune.evalset import load_eval_set


def test_seed_format_jsonl_and_capitalised_keys(tmp_path):
    seed = tmp_path / "eval_set.json"
    seed.write_text(json.dumps([{"question": "Qué es X?", "answer": "Una cosa."}]), encoding="utf-8")
    assert load_eval_set(seed)[0].question == "Qué es X?"
    jsonl = tmp_path / "eval.jsonl"
    jsonl.write_text(
        '{"Question": "A?", "Answer": "a"}\n\n{"QUESTION": "B?", "ANSWER": "b"}\n', encoding="utf-8"
    )
    assert [i.answer for i in load_eval_set(jsonl)] == ["a", "b"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            '[{"question": "A?", "answer": "a"}, {"question": "", "answer": "b"}]',
            "item 1 has no text under 'question'",
        ),
        ('[{"question": "A?"}]', "item 0 has no text under 'answer'"),
        ('["just text"]', "item 0 is str"),
        ("[]", "empty"),
        ('{"q": 1\n', "neither a JSON list nor JSONL"),
    ],
)
def test_malformed_items_are_named(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match=message):
        load_eval_set(path)
