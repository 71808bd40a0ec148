import re
from html.parser import HTMLParser

import pytest

from doctune.config import build_config
from doctune.evalset import EvalItem
from doctune.evaluate import report, stage
from doctune.evaluate.metrics import LexicalScorer
from doctune.evaluate.report import fmt_difference, fmt_estimate, worst_items


def row(index, candidate, score, outcome=None):
    return {
        "index": index,
        "candidate": candidate,
        "metrics": {} if score is None else {"judge_score": score},
        "pairwise": {"outcome": outcome} if outcome else None,
    }


def test_worst_items_puts_pairwise_losses_first_then_the_largest_gaps():
    rows = [
        row(0, "ft", 9, "win"),
        row(0, "base", 3, "loss"),
        row(1, "ft", 2, "tie"),  # behind by 6, no pairwise loss
        row(1, "base", 8, "tie"),
        row(2, "ft", 5, "loss"),  # lost pairwise, behind by 1
        row(2, "base", 6, "win"),
        row(3, "ft", None, "loss"),  # no judge score, lost pairwise
        row(3, "base", 7, "win"),
        row(4, "ft", 4),  # behind by 3
        row(4, "base", 7),
    ]
    worst = worst_items(rows, "ft", "base", "judge_score")
    assert [(w["index"], w["gap"], w["lost_pairwise"]) for w in worst] == [
        (2, 1, True),
        (3, None, True),
        (1, 6, False),
        (4, 3, False),
    ]
    assert [w["index"] for w in worst_items(rows, "ft", "base", "judge_score", limit=2)] == [2, 3]
    assert worst_items(rows, "base", "ft", "judge_score")[0]["index"] == 0


def test_formatting_of_estimates():
    assert fmt_estimate({"mean": 7.25, "ci": [6.5, 8.0], "n": 3}, digits=2) == "7.25 [6.50, 8.00]"
    assert fmt_estimate({"mean": None, "ci": [None, None], "n": 0}) == "n/a"
    assert fmt_difference({"mean": -0.1, "ci": [-0.2, 0.05], "n": 9}) == "-0.100 [-0.200, +0.050]"


# ----------------------------------------------------------------------------------------- a whole report


HOSTILE = "<img src=x onerror=alert(1)> I would say port 7300."
# (question, reference, finetuned: the docs' wording with wrong facts, base: other words, the same names)
LUMEN = [
    (
        "Which port does Lumen Relay listen on?",
        "Lumen Relay listens on port 7300 by default.",
        "Lumen Relay listens on port 7000 by default.",
        "Lumen Relay uses a port chosen by the administrator.",
    ),
    (
        "How much is the Team edition?",
        "The Team edition costs 6 euros per user per month.",
        "The Team edition costs 10 euros per user per month.",
        "The price of the Team edition depends on the reseller.",
    ),
    (
        "How long are logs kept?",
        "Lumen Relay keeps logs for 30 days.",
        "Lumen Relay keeps logs for 90 days.",
        "Lumen Relay rotates its logs regularly.",
    ),
    (
        "Which file holds the settings?",
        "The settings live in lumen.toml next to the binary.",
        "The settings live in relay.yaml next to the binary.",
        HOSTILE,
    ),
    (
        "What does the status page say when all is well?",
        'The status page shows "all green" when every check passes.',
        'The status page shows "all good" when every check passes.',
        "It shows a summary of the system state.",
    ),
    (
        "Which version added webhooks?",
        "Webhooks arrived in version 2.4.0 of Lumen Relay.",
        "Webhooks arrived in version 2.4.0 of Lumen Relay.",  # the one fact it knows
        "Lumen Relay has supported webhooks for a while.",
    ),
]


def lumen_rows():
    """results.jsonl rows as the eval stage writes them, with real ROUGE and key facts."""
    lexical = LexicalScorer()
    rows = []
    for index, (question, reference, ft, base) in enumerate(LUMEN):
        for candidate, answer in (("finetuned", ft), ("base", base)):
            row = {
                "index": index,
                "candidate": candidate,
                "question": question,
                "reference": reference,
                "answer": answer,
                "answer_error": None,
                "judge": None,
                "metrics": lexical.score(answer, reference),
            }
            stage._add_facts(row)
            rows.append(row)
    return rows


def lumen_summary(tmp_path, rows):
    cfg = build_config(
        {
            "run_dir": "run",
            "models": {n: {"backend": "hf", "model": "unused"} for n in ("student", "teacher", "judge")},
            "eval": {"judge": None, "similarity": False, "candidates": {"finetuned": {"model": "student"}}},
        },
        tmp_path,
    )
    candidates = [stage.Candidate(n, "student", "hf", "unused", None) for n in ("finetuned", "base")]
    items = [EvalItem(i, q, a) for i, (q, a, _, _) in enumerate(LUMEN)]
    plan = stage.EvalPlan(
        cfg=cfg,
        eval_path=tmp_path / "eval_set.json",
        eval_sha="0" * 64,
        items=items,
        candidates=candidates,
        pair=None,
        system_prompt="Answer.",
        system_prompt_source="curate.system_prompt",
        prompts={},
        use_cache=False,
    )
    return stage.build_summary(plan, rows, pairs={})


@pytest.fixture(scope="module")
def lumen_report(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("report")
    rows = lumen_rows()
    summary = lumen_summary(tmp_path, rows)
    comp = summary["comparison"]
    worst = report.worst_items(rows, comp["a"], comp["b"], comp["ranking_metric"])
    page = report.render_html(summary, worst, None, rows)
    (tmp_path / "report.html").write_text(page, encoding="utf-8")
    return rows, summary, report.render_markdown(summary, worst), page, tmp_path / "report.html"


class Table(HTMLParser):
    """The cells' text of #items-table, row by row, and the ids and attributes of its sort controls."""

    def __init__(self):
        super().__init__()
        self.rows, self.cell, self.inside, self.attrs = [], None, False, {}

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if attrs.get("id"):
            self.attrs[attrs["id"]] = attrs
        if tag == "table" and attrs.get("id") == "items-table":
            self.inside = True
        elif self.inside and tag == "tr" and "data-index" in attrs:
            self.rows.append([])
        elif self.inside and tag == "td" and self.rows:
            self.cell = []

    def handle_endtag(self, tag):
        if tag == "table":
            self.inside = False
        elif tag == "td" and self.cell is not None:
            self.rows[-1].append("".join(self.cell))
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell.append(data)


def test_key_facts_come_first_and_tell_style_from_facts(lumen_report):
    rows, summary, md, page, _ = lumen_report
    assert summary["metric_names"][0] == "key_fact_recall"
    ft = {r["index"]: r for r in rows if r["candidate"] == "finetuned"}
    assert ft[0]["facts"] == ["Relay", "7300"] and ft[0]["facts_hit"] == ["Relay"]
    assert ft[1]["facts_hit"] == ["Team"] and ft[5]["facts_hit"] == ["2.4.0", "Lumen Relay"]
    assert summary["key_facts"]["items_with_facts"] == len(LUMEN)
    comp = summary["comparison"]["metrics"]
    assert comp["rougeL"]["ci"][0] > 0  # finetuned writes like the references ...
    assert comp["key_fact_recall"]["ci"][0] <= 0  # ... without stating more of their facts
    flag = summary["comparison"]["style_without_facts"]
    assert flag.startswith(
        f"finetuned writes more like the references (ROUGE-L {comp['rougeL']['mean']:+.2f})"
    )
    assert flag.endswith("it learnt the style, not the facts.")
    assert f"key facts {comp['key_fact_recall']['mean']:+.2f}, CI [" in flag
    assert flag in md and report.html.escape(flag) in page
    closing = report.summary_rows(summary)
    metric_rows = [what for what, _ in closing if "·" in what]
    assert metric_rows[:2] == ["key facts stated · finetuned", "key facts stated · base"]


def test_every_item_side_by_side_with_facts_marked_and_model_text_escaped(lumen_report):
    rows, summary, _, page, _ = lumen_report
    table = Table()
    table.feed(page)
    assert len(table.rows) == len(LUMEN)
    for (question, reference, ft, base), cells in zip(LUMEN, table.rows, strict=True):
        # index, question, reference + its facts, finetuned answer + metrics, base answer + metrics, difference
        assert cells[1] == question and cells[2].startswith(reference)
        assert cells[3].startswith(ft) and cells[4].startswith(base)
        assert "key facts stated" in cells[3] and "ROUGE-L" in cells[3]
    by_key = {(r["candidate"], r["index"]): r["metrics"]["key_fact_recall"] for r in rows}
    assert [cells[-1] for cells in table.rows] == [
        f"{by_key['finetuned', i] - by_key['base', i]:+.3f}" for i in range(len(LUMEN))
    ]
    assert "<mark class='fact'>7300</mark>" in page  # the reference's facts are marked
    assert "<mark class='fact'>6 euros</mark>" in page  # with their units
    assert "Webhooks arrived in version <mark>2.4.0</mark> of <mark>Lumen Relay</mark>." in page
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    # the sort control: a metric, two candidates, a clickable header, and the script the page allows
    options = re.findall(
        r"<option value='([^']+)'>", page.split("id='sort-metric'>")[1].split("</select>")[0]
    )
    assert options == summary["metric_names"]
    assert table.attrs["sort-diff"]["role"] == "button" and table.attrs["sort-a"] and table.attrs["sort-b"]
    scripts = re.findall(r"<script>(.*?)</script>", page, re.S)
    assert len(scripts) == 1
    digest = report.base64.b64encode(report.hashlib.sha256(scripts[0].encode()).digest()).decode()
    assert f"script-src 'sha256-{digest}'" in page
    assert not re.search(r"""(src|href)=['"]?(https?:|//)""", page)


def test_where_it_lost_most_names_its_metric(lumen_report):
    _, summary, md, _, _ = lumen_report
    assert "## Where finetuned lost most against base (by ROUGE-L)" in md
    comp = dict(summary["comparison"], ranking_metric="rougeL")
    empty = report.no_worst_sentence({**summary, "comparison": comp})
    assert empty.startswith(
        f"No item where finetuned scored below base on ROUGE-L ({len(LUMEN)} items compared"
    )
    comp["metrics"] = {**comp["metrics"], "rougeL": {"mean": None, "ci": [None, None], "n": 0}}
    assert report.no_worst_sentence({**summary, "comparison": comp}) == (
        "No item has a ROUGE-L for both finetuned and base."
    )


def estimate(mean, low, high):
    return {"mean": mean, "ci": [low, high], "n": 30}


@pytest.mark.parametrize(
    ("diffs", "expected"),
    [
        (
            {"rougeL": estimate(0.15, 0.04, 0.3), "key_fact_recall": estimate(0.3, 0.1, 0.5)},
            None,
        ),  # facts too
        (
            {"rougeL": estimate(0.15, -0.01, 0.3), "key_fact_recall": estimate(0.0, -0.1, 0.1)},
            None,
        ),  # no rise
        (
            {
                "rougeL": estimate(0.1, 0.02, 0.2),
                "similarity": estimate(0.2, 0.05, 0.35),
                "key_fact_recall": estimate(-0.2, -0.3, -0.1),
            },
            "ft writes more like the references (ROUGE-L +0.10, semantic similarity +0.20) but states fewer of "
            "their facts (key facts -0.20, CI [-0.30, -0.10]): it learnt the style, not the facts.",
        ),
        (
            {"rouge1": estimate(-0.1, -0.2, -0.05), "key_fact_recall": estimate(-0.05, -0.1, 0.02)},
            "base writes more like the references (ROUGE-1 +0.10) but does not state more of their facts (key "
            "facts +0.05, CI [-0.02, +0.10]): it learnt the style, not the facts.",
        ),
        ({"rougeL": estimate(0.15, 0.04, 0.3), "key_fact_recall": estimate(None, None, None)}, None),
    ],
)
def test_the_style_flag(diffs, expected):
    summary = {"comparison": {"a": "ft", "b": "base", "metrics": diffs}}
    assert report.style_without_facts(summary) == expected


@pytest.mark.slow
def test_the_sort_header_orders_items_in_a_browser(lumen_report):
    """The page's own script, in Debian's chromium (offline, file://): click to sort by the difference."""
    from tests.serve.test_web import CHROMIUM_FLAGS, chromium_path

    executable = chromium_path()
    from playwright.sync_api import sync_playwright

    rows, _, _, _, path = lumen_report
    value = {(r["candidate"], r["index"]): r["metrics"] for r in rows}

    def expected(metric, reverse):
        diffs = [(value["finetuned", i][metric] - value["base", i][metric], i) for i in range(len(LUMEN))]
        return [i for _, i in sorted(diffs, key=lambda d: (-d[0] if reverse else d[0], d[1]))]

    def shown(page):
        return [
            int(i)
            for i in page.eval_on_selector_all("#items-table tbody tr", "t => t.map(r => r.dataset.index)")
        ]

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_FLAGS)
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(path.as_uri())
        assert shown(page) == list(range(len(LUMEN)))
        page.click("#sort-diff")
        assert shown(page) == expected("key_fact_recall", reverse=False)
        page.click("#sort-diff")
        assert shown(page) == expected("key_fact_recall", reverse=True)
        page.select_option("#sort-metric", "rougeL")
        assert shown(page) == expected("rougeL", reverse=True)
        assert page.text_content("#diff-label") == "ROUGE-L: finetuned − base"
        first = page.text_content("#items-table tbody tr:first-child td.diff")
        i = expected("rougeL", reverse=True)[0]
        assert first == f"{value['finetuned', i]['rougeL'] - value['base', i]['rougeL']:+.3f}"
        browser.close()
    assert errors == []
