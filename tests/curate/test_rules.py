"""Cheap rules: each rejects what it names and lets good pairs through."""

from __future__ import annotations

import pytest

from doctune.curate.rules import ANSWER_COPY_WORDS, check, is_question, normalize

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
    long_answer = " ".join(f"step {i}: run task{i}." for i in range(200))[:2000]
    assert len(long_answer) == 2000 and check({**GOOD, "answer": long_answer}, max_answer_chars=2000) is None
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


# ------------------------------------------------------------------------------ degenerate pairs (weak teacher)

# A chunk of the quickstart docs, and what a 135M teacher wrote about it.
PASSAGE = (
    "## Lumen Relay (the sync server)\n\nLumen Relay is a single binary. Start it with:\n\n"
    "```\nlumen-relay --data /var/lib/lumen --port 7300\n```\n\n"
    "The default port is 7300. The relay keeps an encrypted copy of each vault under the `--data` folder. "
    "To put it behind a reverse proxy, forward HTTPS traffic to port 7300 and set "
    "`--public-url https://notes.example.org`. Run `lumen-relay adduser alice` on the server. The command "
    "prints a one-time invitation code that Alice types into the desktop app under Settings, Sync, Join a relay."
)


def _rule(question, answer, context=PASSAGE):
    return check({"question": question, "answer": answer, "context": context}, max_answer_chars=2000)


@pytest.mark.parametrize(
    ("question", "answer"),
    [
        ("What is the default port of Lumen Relay?", "The default port is 7300."),  # one sentence, verbatim
        (  # two sentences quoted from the passage (30 words): a good extractive answer
            "How do I put the relay behind a reverse proxy?",
            "To put it behind a reverse proxy, forward HTTPS traffic to port 7300 and set "
            "`--public-url https://notes.example.org`. The relay keeps an encrypted copy of each vault.",
        ),
        (  # long, in the teacher's own words with a few phrases of the passage
            "How do I invite a colleague to my relay?",
            "On the machine that runs the relay, add an account for your colleague with the adduser "
            "subcommand, for example `lumen-relay adduser alice`. It gives you a code that is valid once; "
            "your colleague enters it in the desktop application's sync settings when joining the relay, "
            "after which their vault is kept in step through the relay like yours.",
        ),
    ],
)
def test_extractive_and_paraphrased_answers_are_kept(question, answer):
    assert _rule(question, answer) is None


def test_an_answer_that_pastes_the_passage_is_copied_from_context():
    pasted = PASSAGE.split("\n\n", 1)[1]  # the passage minus its heading: ~70 words
    assert _rule("How do I start Lumen Relay?", pasted) == "copied_from_context"
    # a word changed here and there does not hide the paste (n-gram coverage, not one common substring)
    edited = pasted.replace("encrypted", "ciphered").replace("one-time", "single-use")
    assert _rule("How do I start Lumen Relay?", edited) == "copied_from_context"
    # the threshold: answers under ANSWER_COPY_WORDS words stay however copied, at and above it they go
    words = normalize(PASSAGE).split()
    start = words.index("default") - 1  # "the default port is 7300 the relay keeps ..."
    for n, expected in [(ANSWER_COPY_WORDS - 1, None), (ANSWER_COPY_WORDS, "copied_from_context")]:
        answer = " ".join(words[start : start + n]) + "."
        assert _rule("What does the passage say about the relay?", answer) == expected
    # without a context (a user's own pair) there is nothing to copy from
    assert _rule("How do I start Lumen Relay?", pasted, context="") is None


def test_a_question_that_pastes_the_passage_is_copied_from_context():
    question = (
        "The relay keeps an encrypted copy of each vault under the --data folder. To put it behind a reverse "
        "proxy, forward HTTPS traffic to port 7300 and set the public url?"
    )
    assert _rule(question, "Yes, that is how it works.") == "copied_from_context"
    # a question that quotes a heading of the passage is a normal question
    assert _rule("What is Lumen Relay (the sync server)?", "A single binary that syncs vaults.") is None


@pytest.mark.parametrize(
    "answer",
    [
        "1:1:1:1:1:1:1:1:1:1:1:1:1:1:1:1:1:1:1:1:1:1:1:1",
        "The port is 7300 7300 7300 7300 7300 7300 7300 7300 7300",
        "Lumen Relay is a sync server. Lumen Relay is a sync server. Lumen Relay is a sync server. "
        "Lumen Relay is a sync server.",
        "The relay the relay the relay the relay the relay listens on 7300.",
        "Run it with --port=7300=7300=7300=7300=7300=7300",
    ],
)
def test_looping_answers_are_repetitive(answer):
    assert _rule("What is the default port of Lumen Relay?", answer) == "repetitive"


def test_repeated_phrases_that_are_not_a_loop_are_kept():
    price_list = (
        "Community: free for everyone. Team: 6 euros per user per month. Business: 12 euros per user per "
        "month. Enterprise: 20 euros per user per month. Education: 2 euros per user per month."
    )
    assert _rule("How much do the editions of Lumen Notes cost?", price_list) is None
    assert _rule("How is a table rule written in Markdown?", "With a line like |---|---|---|.") is None
    assert _rule("What does the relay print?", "A code such as 1111-2222, valid once.") is None
    assert _rule("Which quotas apply?", "No no: there are no quotas on the relay.") is None


@pytest.mark.parametrize(
    ("question", "answer"),
    [
        ("What is the default port of Lumen Relay?", "its answer"),
        ("What is the default port of Lumen Relay?", "Answer here"),
        ("What is the default port of Lumen Relay?", "<answer>"),
        ("What is the default port of Lumen Relay?", "[Your answer]"),
        ("What is the default port of Lumen Relay?", "..."),
        ("What is the default port of Lumen Relay?", "N/A"),
        ("What is the default port of Lumen Relay?", "Lorem ipsum dolor sit amet, consectetur."),
        ("Question 1", "The default port is 7300."),
        ("<question>", "The default port is 7300."),
        ("question here?", "The default port is 7300."),
    ],
)
def test_template_text_is_a_placeholder(question, answer):
    assert _rule(question, answer) == "placeholder"


def test_short_real_answers_are_not_placeholders():
    for answer in ["None: it has no dependencies.", "A4.", "Yes, from version 2.", "The answer file."]:
        assert _rule("Which paper size does the printout use?", answer) is None, answer


def test_the_same_text_as_question_and_answer_is_named():
    sentence = "Lumen Relay listens on port 7300 by default."
    assert _rule(sentence, sentence) == "question_equals_answer"
    assert _rule("What is the default port?", "what is the default PORT") == "question_equals_answer"
