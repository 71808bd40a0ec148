import pytest
from rouge_score import rouge_scorer

from doctune.evaluate.metrics import (
    ROUGE_TYPES,
    Embedder,
    LexicalScorer,
    exact_match,
    sentences_on_lines,
    token_f1,
)

PAIRS = [
    (
        "The weights are released under the Llama 3 Community License.",
        "Llama 3 weights use a community license.",
    ),
    (
        "Fine-tuning runs on one GPU. It takes about two hours! Then you evaluate it.",
        "You can fine-tune on a single GPU in roughly two hours. Evaluation comes after.",
    ),
    ("", "Something the model did not say."),
    ("Running runners ran; they were running quickly.", "The runner runs quickly."),
    ("completely unrelated words here", "Llama supports an 8K context window."),
]


@pytest.fixture(scope="module")
def lexical() -> LexicalScorer:
    return LexicalScorer()


def test_rouge_equals_rouge_scores_own(lexical):
    own = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    for prediction, reference in PAIRS:
        ours = lexical.score(prediction, reference)
        theirs = own.score(sentences_on_lines(reference), sentences_on_lines(prediction))
        for name in ROUGE_TYPES:
            assert ours[name] == theirs[name].fmeasure, (name, prediction)


def test_rouge_lsum_sees_sentences(lexical):
    # two sentences in swapped order: the summary-level LCS matches both, the plain LCS only one
    scores = lexical.score("B c d. A b c.", "A b c. B c d.")
    assert scores["rougeLsum"] == pytest.approx(1.0)
    assert scores["rougeL"] < scores["rougeLsum"]


def test_sentences_on_lines():
    assert sentences_on_lines("One. Two? Three!  Four") == "One.\nTwo?\nThree!\nFour"
    assert sentences_on_lines("v3.1 is out") == "v3.1 is out"


@pytest.mark.parametrize(
    ("prediction", "reference", "f1", "em"),
    [
        ("The Eiffel Tower", "eiffel tower", 1.0, 1.0),
        ("in Paris, France", "Paris", 0.5, 0.0),
        ("", "", 1.0, 1.0),
        ("", "Paris", 0.0, 0.0),
        ("London", "Paris", 0.0, 0.0),
    ],
)
def test_squad_token_f1_and_exact_match(prediction, reference, f1, em):
    assert token_f1(prediction, reference) == pytest.approx(f1)
    assert exact_match(prediction, reference) == em


@pytest.mark.slow
def test_similarity_ranks_paraphrase_above_unrelated_text():
    embedder = Embedder(device="cpu")
    reference = "The model can read 8,000 tokens of context at once."
    sims = embedder.similarity(
        [reference, "Its context window is 8K tokens.", "Bananas are rich in potassium."],
        [reference] * 3,
    )
    assert sims[0] == pytest.approx(1.0, abs=1e-5)
    assert sims[1] > 0.5 > sims[2]
    assert all(-1.0 <= s <= 1.0 for s in sims)
