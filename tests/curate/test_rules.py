"""Cheap rules: each rejects what it names and lets good pairs through."""

from __future__ import annotations

import pytest

from doctune.curate.rules import check, is_question, normalize

GOOD = {"question": "How do I reset the admin password?", "answer": "Run `admin reset` on the server."}


@pytest.mark.parametrize(
    ("question", "answer", "rule"),
    [
        ("", "An answer.", "empty"),
        ("   ", "An answer.", "empty"),
        ("What is the default port?", "", "empty"),
        (None, "An answer.", "empty"),
        ("Why?", "Because the cache is cold.", "too_short"),
        ("What is X?", "-", "too_short"),
        ("Installation steps for the agent.", "Download it, then run setup.", "not_a_question"),
        ("What is the default port?", "x" * 2001, "answer_too_long"),
        (
            "What is the default port?",
            "What is the default port? The default port is 8080.",
            "question_in_answer",
        ),
        (
            "What is the default port?",
            "You asked: what is the DEFAULT port. It is 8080.",
            "question_in_answer",
        ),
    ],
)
def test_each_rule_names_its_rejection(question, answer, rule):
    assert check({"question": question, "answer": answer}, max_answer_chars=2000) == rule


def test_good_pairs_pass_every_rule():
    assert check(GOOD, max_answer_chars=2000) is None
    assert check({**GOOD, "answer": "x" * 2000}, max_answer_chars=2000) is None
    # a question asked without its mark, and a request instead of a question, are still questions
    assert check({**GOOD, "question": "Explain how the cache is warmed"}, max_answer_chars=2000) is None
    assert check({**GOOD, "question": "how do I reset the admin password"}, max_answer_chars=2000) is None


def test_answer_limit_follows_the_config_value():
    assert check({**GOOD, "answer": "y" * 50}, max_answer_chars=40) == "answer_too_long"


def test_questions_in_other_scripts_count_by_their_question_mark():
    assert is_question("¿Cómo reinicio la contraseña?")
    assert is_question("パスワードをリセットするには？")
    assert is_question("كيف أعيد تعيين كلمة المرور؟")
    assert not is_question("The password reset procedure.")


def test_a_short_word_inside_the_answer_is_not_the_question_repeated():
    pair = {"question": "What is the port?", "answer": "Whatever is the port set in config.yaml: 8080."}
    assert check(pair, max_answer_chars=2000) is None
    assert normalize("What’s  the PORT?!") == "what's the port"
