import hashlib
import json
import re
from pathlib import Path

import pytest
from rouge_score import rouge_scorer
from tests.support.fake_openai import FakeOpenAIServer, Reply

from doctune.config import build_config
from doctune.errors import ConfigError, FailureRateError, InputError
from doctune.evaluate.metrics import ROUGE_TYPES, Embedder, sentences_on_lines
from doctune.evaluate.stage import resolve_candidates, run, training_system_prompt
from doctune.pipeline import overview
from doctune.runs import read_jsonl

ITEMS = [
    {
        "question": f"What does setting {k} control?",
        "answer": f"Setting {k} controls the {word} of the model.",
    }
    for k, word in enumerate(
        ["speed", "size", "context length", "memory use", "precision", "license", "tone", "depth"]
    )
]
ANSWERS = {item["question"]: item["answer"] for item in ITEMS}
HOSTILE = "<script>alert('x')</script> | not a cell"


def candidate_reply(request):
    """The fine-tuned model knows every answer but one (item 3, where it writes markup); the base model
    knows only that one."""
    question = request["messages"][-1]["content"]
    knows = (request["model"] == "ft-model") != (question == ITEMS[3]["question"])
    if knows:
        return ANSWERS[question]
    return HOSTILE if request["model"] == "ft-model" else "I am not sure, maybe it changes the colour."


def fair_judge(request):
    user = request["messages"][-1]["content"]
    reference = re.search(r"Reference answer: (.*)|Teacher answer \(reference\): (.*)", user)
    reference = reference.group(1) or reference.group(2)
    if "Answer A:" in user:
        first = user.split("Answer A: ")[1].split("\n")[0]
        return {"reason": "closer to the reference", "winner": "A" if first == reference else "B"}
    answer = user.split("Student answer: ")[1]
    if "Result" in request["messages"][0]["content"] and "score" not in request["messages"][0]["content"]:
        return {"Reason": "compared", "Result": "YES" if answer == reference else "NO"}
    return {"reason": "compared", "score": 10 if answer == reference else 2}


def reply_for(judge):
    def reply(request):
        if request["model"] == "judge-model":
            return judge(request)
        return candidate_reply(request)

    return reply


def make_config(tmp_path: Path, url: str, items=ITEMS, eval_name="eval_set.json", **eval_fields):
    path = tmp_path / eval_name
    if eval_name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(i) + "\n" for i in items), encoding="utf-8")
    else:
        path.write_text(json.dumps(items), encoding="utf-8")
    server = {"backend": "openai", "base_url": url, "api_key_env": None, "max_retries": 0}
    raw = {
        "run_dir": "run",
        "models": {
            "teacher": {**server, "model": "judge-model"},
            "judge": {**server, "model": "judge-model"},
            "ft": {**server, "model": "ft-model"},
            "base": {**server, "model": "base-model"},
            "student": {"backend": "hf", "model": "unused"},
        },
        "eval": {
            "eval_set": eval_name,
            "max_tokens": 64,
            "candidates": {"finetuned": {"model": "ft"}, "base": {"model": "base"}},
            **eval_fields,
        },
    }
    return build_config(raw, tmp_path)


@pytest.fixture(scope="module")
def server():
    with FakeOpenAIServer(
        reply=reply_for(fair_judge), models=["ft-model", "base-model", "judge-model"]
    ) as srv:
        yield srv


def outputs(cfg):
    out = cfg.run_path / "eval"
    return (
        read_jsonl(out / "results.jsonl"),
        json.loads((out / "summary.json").read_text(encoding="utf-8")),
        (out / "report.md").read_text(encoding="utf-8"),
        (out / "report.html").read_text(encoding="utf-8"),
    )


@pytest.mark.slow
def test_eval_writes_every_output_and_rouge_matches_rouge_score(tmp_path, server):
    cfg = make_config(tmp_path, server.base_url, pairwise=["finetuned", "base"])
    summary = run(cfg)
    rows, summ, md, html = outputs(cfg)

    assert [(r["index"], r["candidate"]) for r in rows] == [
        (i, c) for i in range(len(ITEMS)) for c in ("finetuned", "base")
    ]
    own = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    for row in rows:
        assert row["question"] == ITEMS[row["index"]]["question"]
        assert row["reference"] == ITEMS[row["index"]]["answer"]
        theirs = own.score(sentences_on_lines(row["reference"]), sentences_on_lines(row["answer"]))
        for name in ROUGE_TYPES:
            assert row["metrics"][name] == theirs[name].fmeasure
        assert -1.0 <= row["metrics"]["similarity"] <= 1.0
        assert row["judge"]["error"] is None
    right = [r for r in rows if r["answer"] == r["reference"]]
    assert [(r["index"], r["candidate"]) for r in right if r["candidate"] == "base"] == [(3, "base")]
    assert all(r["metrics"]["exact_match"] == 1.0 and r["metrics"]["judge_score"] == 10 for r in right)
    assert all(r["metrics"]["similarity"] == pytest.approx(1.0, abs=1e-5) for r in right)
    ft = {r["index"]: r for r in rows if r["candidate"] == "finetuned"}
    assert [i for i, r in ft.items() if r["pairwise"]["outcome"] == "loss"] == [3]
    assert all(r["pairwise"]["outcome"] == "win" for i, r in ft.items() if i != 3)

    # key facts: each reference's setting number; the fine-tuned model states all but item 3's, base only that
    assert all(r["facts"] == [str(r["index"])] for r in rows)
    assert [r["index"] for r in rows if r["facts_hit"]] == [0, 1, 2, 3, 4, 5, 6, 7]
    assert [r["candidate"] for r in rows if r["facts_hit"] and r["index"] == 3] == ["base"]
    assert summ["metric_names"][0] == "key_fact_recall"
    assert summ["metrics"]["finetuned"]["key_fact_recall"]["mean"] == pytest.approx(7 / 8)
    assert summ["metrics"]["base"]["key_fact_recall"]["mean"] == pytest.approx(1 / 8)
    assert summ["key_facts"]["stated"] == {"finetuned": {"hit": 7, "of": 8}, "base": {"hit": 1, "of": 8}}
    assert summ["comparison"]["style_without_facts"] is None  # the facts rose with the style
    assert md.index("| key facts stated |") < md.index("| ROUGE-1 |")
    assert (
        summary.rows[1][0] == "items with key facts" and summary.rows[2][0] == "key facts stated · finetuned"
    )

    n = len(ITEMS)
    m = summ["metrics"]
    assert m["finetuned"]["judge_score"]["mean"] == pytest.approx((10 * (n - 1) + 2) / n)
    assert m["base"]["judge_score"]["mean"] == pytest.approx((2 * (n - 1) + 10) / n)
    assert m["finetuned"]["rougeL"]["mean"] > m["base"]["rougeL"]["ci"][1]
    assert summ["comparison"]["metrics"]["judge_score"]["mean"] == pytest.approx(8 * (n - 2) / n)
    assert (summ["pairwise"]["win"], summ["pairwise"]["loss"], summ["pairwise"]["tie"]) == (n - 1, 1, 0)
    assert summ["failures"]["missing_judgements"] == 0

    # every candidate got the same system prompt and decoding settings, and plain-text requests
    asked = [r for r in server.received if r["model"] in ("ft-model", "base-model")]
    assert {r["messages"][0]["content"] for r in asked} == {cfg.curate.system_prompt}
    assert {(r.get("temperature"), r.get("max_tokens") or r.get("max_completion_tokens")) for r in asked} == {
        (0.0, 64)
    }
    assert not any("response_format" in r for r in asked)

    # reports: the numbers, the pairwise result, the worst items, escaped model text, nothing external
    assert "win 7 / tie 0 / loss 1" in md and "ROUGE-L" in md
    assert "### Item 3" in md and "<h3>Item 3" in html
    assert "&lt;script&gt;alert" in html and "<script>alert" not in html and "<script>" not in md
    assert "data:image/png;base64," in html
    assert not re.search(r"""(src|href)=['"]?(https?:|//)""", html)
    assert (
        "## Where finetuned lost most against base (pairwise losses first, then by judge score (1-10))" in md
    )
    assert any(what.startswith("judge score") for what, _ in summary.rows)


@pytest.mark.slow
def test_two_runs_over_one_cache_give_identical_summaries(tmp_path, server, monkeypatch):
    """The second run sends no request and embeds no text (replies from cache.sqlite, MiniLM vectors from
    eval/embeddings.sqlite), and writes the same summary."""
    embedded: list[str] = []
    encode = Embedder._encode
    monkeypatch.setattr(
        Embedder, "_encode", lambda self, texts: embedded.extend(texts) or encode(self, texts)
    )
    cfg = make_config(tmp_path, server.base_url, eval_name="eval.jsonl", pairwise=["base", "finetuned"])
    run(cfg)
    first = (cfg.run_path / "eval" / "summary.json").read_bytes()
    assert set(embedded) >= {item["answer"] for item in ITEMS}  # references and answers
    before, embedded_first = server.total_requests(), len(embedded)
    run(cfg)
    assert server.total_requests() == before  # everything came from cache.sqlite
    assert len(embedded) == embedded_first  # and every vector from the embedding store
    assert (cfg.run_path / "eval" / "summary.json").read_bytes() == first
    summ = json.loads(first)
    assert (summ["pairwise"]["win"], summ["pairwise"]["loss"]) == (
        1,
        len(ITEMS) - 1,
    )  # base against finetuned
    manifest = json.loads((cfg.run_path / "manifest.json").read_text())
    assert manifest["stages"]["eval"]["counts"]["cached_answers"] == 2 * len(ITEMS)


@pytest.mark.slow
def test_manifest_records_tokens_like_every_stage_sent_then_cached(tmp_path, server):
    """tokens: Usage.tokens() of answers and judge together (prompt, completion, *_cached, *_sent); notes split
    them; a rerun over the cache sends none."""
    cfg = make_config(tmp_path, server.base_url, pairwise=["finetuned", "base"])
    manifest_file = cfg.run_path / "manifest.json"
    run(cfg)
    rows = read_jsonl(cfg.run_path / "eval" / "results.jsonl")
    entry = json.loads(manifest_file.read_text())["stages"]["eval"]
    answers, judge, tokens = entry["notes"]["tokens_answers"], entry["notes"]["tokens_judge"], entry["tokens"]
    assert answers["prompt"] == sum(r["prompt_tokens"] for r in rows) > 0
    assert answers["completion"] == sum(r["completion_tokens"] for r in rows) > 0
    assert judge["prompt"] > 0 and judge["completion"] > 0  # grades and both orders of the pairwise judge
    assert tokens["prompt"] == answers["prompt"] + judge["prompt"]
    assert tokens["completion"] == answers["completion"] + judge["completion"]
    assert tokens["prompt_sent"] == tokens["prompt"] and tokens["prompt_cached"] == 0

    run(cfg)
    again = json.loads(manifest_file.read_text())["stages"]["eval"]["tokens"]
    assert again["prompt"] == tokens["prompt"] and again["completion"] == tokens["completion"]
    assert again["prompt_cached"] == tokens["prompt"] and again["prompt_sent"] == 0
    assert again["completion_sent"] == 0
    # `doctune run`'s closing table counts each token once (not again in the *_cached / *_sent splits)
    rows = dict(overview(cfg, []).rows)
    assert rows["LLM tokens (prompt / completion)"] == f"{tokens['prompt']:,} / {tokens['completion']:,}"


def test_garbage_judge_is_counted_never_scored_zero(tmp_path):
    def flaky(request):
        digest = hashlib.sha256(request["messages"][-1]["content"].encode()).digest()
        return "I'd rather not say {{{" if digest[0] % 2 else fair_judge(request)

    with FakeOpenAIServer(reply=reply_for(flaky), models=["ft-model", "base-model", "judge-model"]) as srv:
        cfg = make_config(tmp_path, srv.base_url)
        with pytest.raises(FailureRateError, match=r"eval\.max_failure_rate"):
            run(cfg)
    rows, summ, md, html = outputs(cfg)  # everything written before the error
    missing = [r for r in rows if r["judge"]["error"]]
    assert 0 < len(missing) < len(rows)
    assert all("judge_score" not in r["metrics"] and r["judge"]["score"] is None for r in missing)
    assert all(r["judge"]["raw"] == "I'd rather not say {{{" for r in missing)
    judged = {
        c: [r for r in rows if r["candidate"] == c and not r["judge"]["error"]] for c in ("finetuned", "base")
    }
    for cand, good in judged.items():
        assert summ["metrics"][cand]["judge_score"]["n"] == len(good)
    scores = [r["judge"]["score"] for r in judged["finetuned"]]
    assert summ["metrics"]["finetuned"]["judge_score"]["mean"] == pytest.approx(sum(scores) / len(scores))
    assert min(scores) >= 2  # a missing judgement is not a zero
    assert summ["failures"]["missing_judgements"] == len(missing)
    assert f"Missing judgements: {len(missing)} of {len(rows)}" in md
    assert f"Missing judgements: {len(missing)} of {len(rows)}" in html


def test_failed_answers_are_listed_and_left_out(tmp_path):
    def reply(request):
        if request["model"] == "base-model" and request["messages"][-1]["content"] == ITEMS[0]["question"]:
            return Reply(status=400, message="prompt too long")
        return reply_for(fair_judge)(request)

    seed_prompts = tmp_path / "eval_config.yaml"  # a user's YAML replaces the packaged YES/NO prompt
    seed_prompts.write_text('judge_prompt_template: "Grade it. Return JSON with Reason and Result."\n')
    with FakeOpenAIServer(reply=reply, models=["ft-model", "base-model", "judge-model"]) as srv:
        cfg = make_config(tmp_path, srv.base_url, judge_mode="yesno", max_failure_rate=0.5)
        cfg.eval.prompts = str(seed_prompts)
        run(cfg)
        judged = [r for r in srv.received if r["model"] == "judge-model"]
    assert {r["messages"][0]["content"] for r in judged} == {"Grade it. Return JSON with Reason and Result."}
    rows, summ, md, _ = outputs(cfg)
    failed = [r for r in rows if r["answer_error"]]
    assert [(r["index"], r["candidate"]) for r in failed] == [(0, "base")]
    assert failed[0]["metrics"] == {} and failed[0]["judge"] is None and failed[0]["facts_hit"] is None
    assert summ["metrics"]["base"]["rougeL"]["n"] == len(ITEMS) - 1
    assert summ["metrics"]["finetuned"]["judge_yes"]["mean"] == pytest.approx((len(ITEMS) - 1) / len(ITEMS))
    assert summ["metrics"]["base"]["judge_yes"]["mean"] == pytest.approx(1 / (len(ITEMS) - 1))  # item 3 only
    assert summ["failures"]["answers"] == {"finetuned": 0, "base": 1}
    assert "Failed answers: 1 of 16" in md


@pytest.mark.parametrize(
    ("items", "message"),
    [
        ([*ITEMS[:2], {"question": "Where is it?"}], "item 2 has no text under 'answer'"),
        ([ITEMS[0], "just a string"], "item 1 is str"),
    ],
)
def test_malformed_eval_set_fails_before_any_request(tmp_path, items, message):
    with FakeOpenAIServer(
        reply=reply_for(fair_judge), models=["ft-model", "base-model", "judge-model"]
    ) as srv:
        cfg = make_config(tmp_path, srv.base_url, items=items)
        with pytest.raises(InputError, match=message):
            run(cfg)
        assert srv.total_requests() == 0
    assert not (cfg.run_path / "eval").exists()


def test_candidate_and_pairwise_mistakes_are_config_errors(tmp_path, server):
    cfg = make_config(tmp_path, server.base_url, candidates={"a": {"model": "ft", "adapter": "somewhere"}})
    with pytest.raises(ConfigError, match=r"eval.candidates.a.adapter: 'ft' is an openai model"):
        run(cfg)
    cfg = make_config(tmp_path, server.base_url, judge=None, pairwise=["finetuned", "base"])
    with pytest.raises(ConfigError, match=r"eval\.pairwise: needs a judge"):
        run(cfg)
    assert server.total_requests() == 0 or not (tmp_path / "run" / "eval").exists()


@pytest.mark.parametrize("info", ["{not json", "[1, 2]"])
def test_an_unreadable_adapter_info_file_is_one_line_before_any_request(tmp_path, server, info):
    """doctune_finetune.json read as every command reads it (AdapterDir): not a JSON object is one InputError."""
    adapter = tmp_path / "elsewhere" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}", encoding="utf-8")
    (adapter / "doctune_finetune.json").write_text(info, encoding="utf-8")
    before = server.total_requests()
    cfg = make_config(
        tmp_path, server.base_url, candidates={"tuned": {"model": "student", "adapter": str(adapter)}}
    )
    with pytest.raises(InputError, match=r"doctune_finetune\.json: not (valid JSON|a JSON object)") as err:
        run(cfg)
    assert "\n" not in str(err.value) and "doctune finetune" in str(err.value)
    assert server.total_requests() == before and not (cfg.run_path / "eval").exists()


def test_the_training_system_prompt_comes_from_a_candidate_adapter_kept_anywhere(tmp_path, server):
    adapter = tmp_path / "elsewhere" / "adapter"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}", encoding="utf-8")
    cfg = make_config(
        tmp_path, server.base_url, candidates={"tuned": {"model": "student", "adapter": str(adapter)}}
    )
    candidates = resolve_candidates(cfg)
    assert training_system_prompt(cfg, candidates) == (cfg.curate.system_prompt, "curate.system_prompt")
    (adapter / "doctune_finetune.json").write_text(
        json.dumps({"system_prompt": "Be brief."}), encoding="utf-8"
    )
    assert training_system_prompt(cfg, candidates) == ("Be brief.", str(adapter / "doctune_finetune.json"))
