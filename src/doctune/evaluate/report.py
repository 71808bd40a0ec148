"""Human reports of an eval: report.md and a self-contained report.html (chart embedded as a PNG, every piece of
model text escaped), plus the rows of the summary table the CLI prints.

Everything here is a pure function of summary.json's content and the result rows.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
from collections.abc import Sequence
from typing import Any

from doctune.evaluate import facts
from doctune.runs import RunDir

LABELS = {
    "key_fact_recall": "key facts stated",
    "rouge1": "ROUGE-1",
    "rouge2": "ROUGE-2",
    "rougeL": "ROUGE-L",
    "rougeLsum": "ROUGE-Lsum",
    "token_f1": "token F1",
    "exact_match": "exact match",
    "similarity": "semantic similarity",
    "judge_score": "judge score (1-10)",
    "judge_yes": "judge YES rate",
}
UNIT_METRICS = (
    "key_fact_recall",
    "rouge1",
    "rouge2",
    "rougeL",
    "rougeLsum",
    "token_f1",
    "exact_match",
    "similarity",
    "judge_yes",
)
WORST_LIMIT = 10
RESULTS_FILE = RunDir(".").eval_results.name  # named in the failures list
STYLE_METRICS = ("rougeL", "similarity")  # named first when they rise; other ROUGE variants only without them
ROUGE_VARIANTS = ("rouge1", "rouge2", "rougeLsum")


def label(metric: str) -> str:
    return LABELS.get(metric, metric)


def fmt_estimate(est: dict[str, Any] | None, digits: int = 3) -> str:
    """`0.312 [0.290, 0.334]`, or `n/a` when there is no value.

    >>> fmt_estimate({"mean": 0.5, "ci": [0.25, 0.75], "n": 4})
    '0.500 [0.250, 0.750]'
    """
    if not est or est.get("mean") is None:
        return "n/a"
    low, high = est["ci"]
    return f"{est['mean']:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def fmt_difference(est: dict[str, Any] | None, digits: int = 3) -> str:
    """`+0.120 [+0.050, +0.190]`: a signed paired difference."""
    if not est or est.get("mean") is None:
        return "n/a"
    low, high = est["ci"]
    return f"{est['mean']:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}]"


def headline_metric(summary: dict[str, Any]) -> str:
    """The metric that ranks items: the judge's when there is one, else ROUGE-L."""
    judge = summary.get("judge")
    if judge:
        return "judge_yes" if judge["mode"] == "yesno" else "judge_score"
    return "rougeL"


# ----------------------------------------------------------------------------------------- summary table


def summary_rows(summary: dict[str, Any]) -> list[tuple[str, str]]:
    """(what, value) rows of the closing table: every metric per candidate, the paired differences, failures."""
    rows: list[tuple[str, str]] = [("items", str(summary["eval_set"]["items"]))]
    if summary.get("key_facts"):
        rows.append(("items with key facts", key_facts_line(summary)))
    for metric in summary["metric_names"]:
        for cand in summary["candidates"]:
            rows.append((f"{label(metric)} · {cand}", fmt_estimate(summary["metrics"][cand].get(metric))))
    comp = summary.get("comparison")
    if comp:
        for metric in summary["metric_names"]:
            rows.append(
                (f"{label(metric)} · {comp['a']} − {comp['b']}", fmt_difference(comp["metrics"][metric]))
            )
    pair = summary.get("pairwise")
    if pair:
        rows.append(
            (
                f"pairwise {pair['a']} vs {pair['b']}",
                f"win {pair['win']} / tie {pair['tie']} / loss {pair['loss']} (no verdict {pair['missing']})",
            )
        )
    failures = summary["failures"]
    rows.append(("failed answers", str(sum(failures["answers"].values()))))
    if summary.get("judge"):
        rows.append(("missing judgements", f"{failures['missing_judgements']} of {failures['judgements']}"))
    return rows


def key_facts_line(summary: dict[str, Any]) -> str:
    """`6 of 8 (2 without key facts, left out of its mean); stated: finetuned 5 of 9, base 0 of 9`."""
    kf = summary["key_facts"]
    stated = ", ".join(f"{c} {s['hit']} of {s['of']}" for c, s in kf["stated"].items())
    return (
        f"{kf['items_with_facts']} of {kf['items_with_facts'] + kf['items_without_facts']} "
        f"({kf['items_without_facts']} without key facts, left out of its mean); facts stated: {stated}"
    )


def _rose(est: dict[str, Any] | None, sign: int) -> bool:
    """Whether the paired difference (times `sign`) has its whole 95% CI above zero."""
    if not est or est.get("mean") is None:
        return False
    low, high = est["ci"]
    return (low > 0) if sign > 0 else (high < 0)


def style_without_facts(summary: dict[str, Any]) -> str | None:
    """A sentence when one candidate writes more like the references (ROUGE or similarity: paired difference
    CI above zero) but does not state more of their key facts (CI includes zero or is below); else None.

    >>> est = lambda m, lo, hi: {"mean": m, "ci": [lo, hi], "n": 8}
    >>> s = {"comparison": {"a": "finetuned", "b": "base", "metrics": {
    ...     "key_fact_recall": est(0.02, -0.05, 0.09), "rougeL": est(0.15, 0.04, 0.3)}}}
    >>> print(style_without_facts(s))  # doctest: +NORMALIZE_WHITESPACE
    finetuned writes more like the references (ROUGE-L +0.15) but does not state more of their facts
    (key facts +0.02, CI [-0.05, +0.09]): it learnt the style, not the facts.
    """
    comp = summary.get("comparison")
    if not comp:
        return None
    diffs = comp["metrics"]
    key = diffs.get(facts.KEY_FACTS)
    if not key or key.get("mean") is None:
        return None
    for sign, winner in ((1, comp["a"]), (-1, comp["b"])):
        if _rose(key, sign):
            continue
        rising = [m for m in STYLE_METRICS if _rose(diffs.get(m), sign)]
        rising = rising or [m for m in ROUGE_VARIANTS if _rose(diffs.get(m), sign)][:1]
        if not rising:
            continue
        style = ", ".join(f"{label(m)} {sign * diffs[m]['mean']:+.2f}" for m in rising)
        low, high = sorted(sign * v for v in key["ci"])
        fewer = "states fewer of their facts" if high < 0 else "does not state more of their facts"
        return (
            f"{winner} writes more like the references ({style}) but {fewer} (key facts "
            f"{sign * key['mean']:+.2f}, CI [{low:+.2f}, {high:+.2f}]): it learnt the style, not the facts."
        )
    return None


# ----------------------------------------------------------------------------------------- worst items


def worst_items(
    rows: Sequence[dict[str, Any]], a: str, b: str, metric: str, limit: int = WORST_LIMIT
) -> list[dict[str, Any]]:
    """Items where `a` fell furthest behind `b`: pairwise losses first, then by the gap in `metric`."""
    by_key = {(r["candidate"], r["index"]): r for r in rows}
    found = []
    for (cand, index), row_a in by_key.items():
        row_b = by_key.get((b, index))
        if cand != a or row_b is None:
            continue
        va, vb = (row_a.get("metrics") or {}).get(metric), (row_b.get("metrics") or {}).get(metric)
        gap = vb - va if va is not None and vb is not None else None
        lost = (row_a.get("pairwise") or {}).get("outcome") == "loss"
        if lost or (gap is not None and gap > 0):
            found.append({"index": index, "gap": gap, "lost_pairwise": lost, "a": row_a, "b": row_b})
    found.sort(key=lambda w: (not w["lost_pairwise"], -(w["gap"] or 0.0), w["index"]))
    return found[:limit]


# ----------------------------------------------------------------------------------------- chart


def import_chart_libs() -> None:
    """Import matplotlib ahead of time (in the background while models answer): ~1 s less at the end."""
    import matplotlib.backends.backend_agg
    import matplotlib.figure  # noqa: F401


def bar_chart(summary: dict[str, Any]) -> bytes:
    """PNG: each metric's mean per candidate with its 95% CI (0-1 metrics left, judge score right)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cands = list(summary["candidates"])
    unit = [m for m in summary["metric_names"] if m in UNIT_METRICS]
    other = [m for m in summary["metric_names"] if m not in UNIT_METRICS]
    fig = Figure(figsize=(10 if other else 8, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    widths = [max(len(unit), 1), len(other)] if other else [1]
    axes = fig.subplots(1, len(widths), gridspec_kw={"width_ratios": widths}, squeeze=False)[0]
    width = 0.8 / max(len(cands), 1)
    for ax, metrics in zip(axes, [unit, other] if other else [unit], strict=True):
        for k, cand in enumerate(cands):
            xs, means, errs = [], [], [[], []]
            for j, metric in enumerate(metrics):
                est = summary["metrics"][cand].get(metric) or {}
                if est.get("mean") is None:
                    continue
                xs.append(j + (k - (len(cands) - 1) / 2) * width)
                means.append(est["mean"])
                errs[0].append(est["mean"] - est["ci"][0])
                errs[1].append(est["ci"][1] - est["mean"])
            ax.bar(xs, means, width, yerr=errs, capsize=3, label=cand)
        ax.set_xticks(range(len(metrics)), [label(m) for m in metrics], rotation=30, ha="right")
        ax.grid(axis="y", alpha=0.3)
        if metrics and all(m in UNIT_METRICS for m in metrics):
            lows = [summary["metrics"][c][m]["ci"][0] for c in cands for m in metrics]
            ax.set_ylim(min([0.0, *(v for v in lows if v is not None)]), 1)
        elif "judge_score" in metrics:
            ax.set_ylim(0, 10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside upper right", ncols=len(cands))
    fig.suptitle("mean per candidate with 95% bootstrap CI", x=0.02, ha="left")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


# ----------------------------------------------------------------------------------------- markdown


def _md_cell(text: str | None) -> str:
    """Model text made safe inside a Markdown table cell: HTML escaped, pipes escaped, newlines as <br>."""
    if text is None:
        return "—"
    return html.escape(text).replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def _judge_text(row: dict[str, Any]) -> str:
    judge = row.get("judge")
    if not judge:
        return ""
    if judge.get("error"):
        return f"no judgement ({judge['error']})"
    return f"{judge['score']:g}: {judge.get('reason') or ''}"


def _header_lines(summary: dict[str, Any]) -> list[str]:
    judge = summary.get("judge")
    cands = ", ".join(
        f"**{name}** = {c['model']} ({c['backend']} `{c['model_id']}`"
        + (f" + adapter `{c['adapter']}`" if c.get("adapter") else "")
        + ")"
        for name, c in summary["candidates"].items()
    )
    dec = summary["decoding"]
    return [
        f"- Eval set: `{summary['eval_set']['path']}` ({summary['eval_set']['items']} items)",
        f"- Candidates: {cands}",
        f"- Same for all: temperature {dec['temperature']}, max_tokens {dec['max_tokens']}, system prompt "
        f"(from {summary['system_prompt_source']}): {_md_cell(summary['system_prompt'])}",
        f"- Judge: {judge['model']} (`{judge['model_id']}`), mode {judge['mode']}"
        if judge
        else "- Judge: none",
    ]


def render_markdown(summary: dict[str, Any], worst: Sequence[dict[str, Any]]) -> str:
    """report.md: the same parts as report.html, less the chart and the table of every item."""
    lines = [
        "# doctune eval report",
        "",
        *_header_lines(summary),
        "",
        *_md_style_flag(summary),
        *_md_metrics(summary),
        *_md_comparison(summary),
        *_md_pairwise(summary),
        *_md_failures(summary),
        *_md_worst(summary, worst),
    ]
    return "\n".join(lines).rstrip() + "\n"


def _md_style_flag(summary: dict[str, Any]) -> list[str]:
    flag = style_without_facts(summary)
    return [f"> **Style, not facts:** {_md_cell(flag)}", ""] if flag else []


def _md_metrics(summary: dict[str, Any]) -> list[str]:
    cands = list(summary["candidates"])
    lines = ["## Metrics (mean [95% bootstrap CI], n items)", ""]
    if summary.get("key_facts"):
        lines += [
            f"Key facts (numbers with units, names, quoted and code spans of the reference): items with "
            f"key facts {_md_cell(key_facts_line(summary))}.",
            "",
        ]
    lines += ["| metric | " + " | ".join(cands) + " |", "|---|" + "---|" * len(cands)]
    for metric in summary["metric_names"]:
        cells = [
            f"{fmt_estimate(summary['metrics'][c].get(metric))} n={summary['metrics'][c][metric]['n']}"
            for c in cands
        ]
        lines.append(f"| {label(metric)} | " + " | ".join(cells) + " |")
    return lines


def _md_comparison(summary: dict[str, Any]) -> list[str]:
    comp = summary.get("comparison")
    if not comp:
        return []
    lines = ["", f"## {comp['a']} − {comp['b']} (paired difference per item, 95% CI)", ""]
    lines += ["| metric | difference | n |", "|---|---|---|"]
    for metric in summary["metric_names"]:
        est = comp["metrics"][metric]
        lines.append(f"| {label(metric)} | {fmt_difference(est)} | {est['n']} |")
    return lines


def _md_pairwise(summary: dict[str, Any]) -> list[str]:
    pair = summary.get("pairwise")
    if not pair:
        return []
    return [
        "",
        f"## Pairwise judge: {pair['a']} vs {pair['b']}",
        "",
        f"Asked in both orders; a win needs the same preference twice. **win {pair['win']} / tie "
        f"{pair['tie']} / loss {pair['loss']}**, no verdict for {pair['missing']}. "
        f"Win rate of {pair['a']} (tie = ½): {fmt_estimate(pair['win_rate'])}.",
    ]


def _md_failures(summary: dict[str, Any]) -> list[str]:
    facts, failed = failure_lines(summary)
    return [
        "",
        "## Failures",
        "",
        *(f"- {line}" for line in facts),
        *(f"  - {_md_cell(x)}" for x in failed),
    ]


def _md_worst(summary: dict[str, Any], worst: Sequence[dict[str, Any]]) -> list[str]:
    comp = summary.get("comparison")
    if not comp:
        return []
    lines = ["", f"## {worst_title(summary)}", ""]
    if not worst:
        lines.append(no_worst_sentence(summary))
    for w in worst:
        lines += _md_worst_item(comp, w)
    return lines


def _md_worst_item(comp: dict[str, Any], w: dict[str, Any]) -> list[str]:
    ra, rb = w["a"], w["b"]
    gap = f"{label(comp['ranking_metric'])} gap {w['gap']:.3f}" if w["gap"] is not None else ""
    lost = "lost the pairwise judgement" if w["lost_pairwise"] else ""
    lines = [f"### Item {w['index']} — " + ", ".join(x for x in (lost, gap) if x), ""]
    lines += [f"**Question:** {_md_cell(ra['question'])}", ""]
    lines += [f"| reference | {comp['a']} | {comp['b']} |", "|---|---|---|"]
    lines.append(
        f"| {_md_cell(ra['reference'])} | {_md_cell(ra['answer'] or ra.get('answer_error'))} "
        f"| {_md_cell(rb['answer'] or rb.get('answer_error'))} |"
    )
    if ra.get("judge") or rb.get("judge"):
        lines.append(f"| *judge* | {_md_cell(_judge_text(ra))} | {_md_cell(_judge_text(rb))} |")
    lines.append("")
    return lines


def worst_title(summary: dict[str, Any]) -> str:
    comp = summary["comparison"]
    by = label(comp["ranking_metric"])
    first = "pairwise losses first, then " if summary.get("pairwise") else ""
    return f"Where {comp['a']} lost most against {comp['b']} ({first}by {by})"


def no_worst_sentence(summary: dict[str, Any]) -> str:
    """What an empty "lost most" list means, for the metric it ranks by (other metrics may differ)."""
    comp = summary["comparison"]
    metric = comp["ranking_metric"]
    paired = (comp["metrics"].get(metric) or {}).get("n", 0)
    lost = " nor lost the pairwise judgement" if summary.get("pairwise") else ""
    if not paired:
        return f"No item has a {label(metric)} for both {comp['a']} and {comp['b']}{lost}."
    return (
        f"No item where {comp['a']} scored below {comp['b']} on {label(metric)}{lost} ({paired} items compared; "
        "other metrics may differ)."
    )


def failure_lines(summary: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Plain-text facts about failures, and one line per failed answer or missing judgement (at most 50)."""
    f = summary["failures"]
    per_cand = ", ".join(f"{c}: {n}" for c, n in f["answers"].items())
    facts = [f"Failed answers: {sum(f['answers'].values())} of {f['answers_total']} ({per_cand})"]
    if summary.get("judge"):
        facts.append(
            f"Missing judgements: {f['missing_judgements']} of {f['judgements']} (failed or unparseable judge "
            "replies; left out of the judge's mean, never scored 0)"
        )
    if summary.get("pairwise"):
        facts.append(f"Pairwise items without a verdict: {summary['pairwise']['missing']}")
    facts.append(f"Failure rate: {f['rate']:.3f} (allowed: {f['max_failure_rate']})")
    listed = summary.get("failed_answer_items", []) + summary.get("missing_judgement_items", [])
    items = [f"item {m['index']} · {m['candidate']}: {m['error']}" for m in listed[:50]]
    if len(listed) > 50:
        items.append(f"… {len(listed) - 50} more in {RESULTS_FILE}")
    return facts, items


# ----------------------------------------------------------------------------------------- html

_CSS = """
body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1200px;padding:0 1rem;color:#222}
table{border-collapse:collapse;margin:.5rem 0 1.5rem}td,th{border:1px solid #ccc;padding:.3rem .6rem;
vertical-align:top;text-align:left}th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.side td{width:33%;white-space:pre-wrap}img{max-width:100%}code{background:#f3f3f3;padding:0 .2rem}
.muted{color:#777}.flag{background:#fff4d6;border-left:4px solid #e0a100;padding:.5rem 1rem}
mark{background:#c9f2c7;padding:0 .1rem}mark.fact{background:#e6e6ff}
table.items td{white-space:pre-wrap;max-width:24rem;font-size:.92rem}.items .m{white-space:normal;color:#555;
font-size:.8rem;margin-top:.3rem}th.sortable{cursor:pointer;text-decoration:underline dotted}
"""

# Sorts the table of every item by the difference of two candidates on a chosen metric; plain JS, no library.
_ITEMS_JS = """
(function () {
  var table = document.getElementById('items-table');
  if (!table) return;
  var body = table.tBodies[0], head = document.getElementById('sort-diff');
  var pick = {m: 'sort-metric', a: 'sort-a', b: 'sort-b'}, dir = 0, values = new Map();
  for (var k in pick) pick[k] = document.getElementById(pick[k]);
  Array.prototype.forEach.call(body.rows, function (tr) { values.set(tr, JSON.parse(tr.dataset.values)); });
  function diff(tr) {
    var v = values.get(tr), x = (v[pick.a.value] || {})[pick.m.value], y = (v[pick.b.value] || {})[pick.m.value];
    return (x === null || x === undefined || y === null || y === undefined) ? null : x - y;
  }
  function refresh() {
    Array.prototype.forEach.call(body.rows, function (tr) {
      var d = diff(tr);
      tr.querySelector('td.diff').textContent = d === null ? 'n/a' : (d >= 0 ? '+' : '') + d.toFixed(3);
    });
    document.getElementById('diff-label').textContent =
      pick.m.options[pick.m.selectedIndex].text + ': ' + pick.a.value + ' \u2212 ' + pick.b.value;
  }
  function sort() {
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (r, s) {
      var d = diff(r), e = diff(s), i = r.dataset.index - s.dataset.index;
      if (d === null || e === null) return (d === null) - (e === null) || i;
      return dir * (d - e) || i;
    });
    rows.forEach(function (r) { body.appendChild(r); });
    head.setAttribute('aria-sort', dir > 0 ? 'ascending' : 'descending');
    document.getElementById('sort-arrow').textContent = dir > 0 ? '\u25b2' : '\u25bc';
  }
  head.addEventListener('click', function () { dir = dir === 1 ? -1 : 1; sort(); });
  head.addEventListener('keydown', function (e) { if (e.key === 'Enter' || e.key === ' ') head.click(); });
  [pick.m, pick.a, pick.b].forEach(function (s) {
    s.addEventListener('change', function () { refresh(); if (dir) sort(); });
  });
  refresh();
})();
"""
_ITEMS_JS_HASH = base64.b64encode(hashlib.sha256(_ITEMS_JS.encode()).digest()).decode()
# model text is escaped; the policy also keeps any script but ours from running, and nothing loads from outside
_CSP = f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'sha256-{_ITEMS_JS_HASH}'"


def _h(text: Any) -> str:
    return html.escape(str(text), quote=True)


def render_html(
    summary: dict[str, Any],
    worst: Sequence[dict[str, Any]],
    chart_png: bytes | None,
    rows: Sequence[dict[str, Any]] = (),
) -> str:
    """A single self-contained page: no external assets, every model-written string escaped; with `rows`
    (results.jsonl), a table of every item side by side, sortable in the browser."""
    out = [
        *_html_head(),
        *_html_header(summary),
        *_html_style_flag(summary),
        *_html_metrics(summary),
        *_html_chart(chart_png),
        *_html_comparison(summary),
        *_html_pairwise(summary),
        *_html_failures(summary),
        *(items_table(summary, rows) if rows else []),
        *_html_worst(summary, worst),
        *([f"<script>{_ITEMS_JS}</script>"] if rows else []),
        "</body></html>",
    ]
    return "\n".join(out) + "\n"


def _html_head() -> list[str]:
    """The page up to <body>: the content security policy and the style sheet."""
    return [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8"><title>doctune eval report</title>',
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        f"<style>{_CSS}</style></head><body>",
    ]


def _html_header(summary: dict[str, Any]) -> list[str]:
    """The title and what was compared: eval set, candidates, decoding and system prompt, judge."""
    dec = summary["decoding"]
    judge = summary.get("judge")
    out = [
        "<h1>doctune eval report</h1><ul>",
        f"<li>Eval set: <code>{_h(summary['eval_set']['path'])}</code> ({summary['eval_set']['items']} items)</li>",
    ]
    for name, c in summary["candidates"].items():
        adapter = f" + adapter <code>{_h(c['adapter'])}</code>" if c.get("adapter") else ""
        out.append(
            f"<li>Candidate <b>{_h(name)}</b>: {_h(c['model'])} ({_h(c['backend'])} "
            f"<code>{_h(c['model_id'])}</code>{adapter})</li>"
        )
    out.append(
        f"<li>Same for all: temperature {_h(dec['temperature'])}, max_tokens {_h(dec['max_tokens'])}, system "
        f"prompt (from {_h(summary['system_prompt_source'])}): <q>{_h(summary['system_prompt'])}</q></li>"
    )
    out.append(
        f"<li>Judge: {_h(judge['model'])} (<code>{_h(judge['model_id'])}</code>), mode {_h(judge['mode'])}</li>"
        if judge
        else "<li>Judge: none</li>"
    )
    out.append("</ul>")
    return out


def _html_style_flag(summary: dict[str, Any]) -> list[str]:
    flag = style_without_facts(summary)
    return [f"<p class='flag' id='style-flag'><b>Style, not facts:</b> {_h(flag)}</p>"] if flag else []


def _html_metrics(summary: dict[str, Any]) -> list[str]:
    """Each metric's mean with its CI per candidate, after a line on the key facts."""
    cands = list(summary["candidates"])
    out = ["<h2>Metrics <span class='muted'>(mean [95% bootstrap CI], n items)</span></h2>"]
    if summary.get("key_facts"):
        out.append(
            "<p>Key facts are the numbers with their units, names, quoted and code spans of each reference "
            f"answer. Items with key facts: {_h(key_facts_line(summary))}.</p>"
        )
    out.append("<table><tr><th>metric</th>" + "".join(f"<th>{_h(c)}</th>" for c in cands) + "</tr>")
    for metric in summary["metric_names"]:
        cells = "".join(
            f"<td class='num'>{_h(fmt_estimate(summary['metrics'][c].get(metric)))} "
            f"<span class='muted'>n={summary['metrics'][c][metric]['n']}</span></td>"
            for c in cands
        )
        out.append(f"<tr><td>{_h(label(metric))}</td>{cells}</tr>")
    out.append("</table>")
    return out


def _html_chart(chart_png: bytes | None) -> list[str]:
    if not chart_png:
        return []
    data = base64.b64encode(chart_png).decode("ascii")
    return [f"<img alt='metrics per candidate with 95% CI' src='data:image/png;base64,{data}'>"]


def _html_comparison(summary: dict[str, Any]) -> list[str]:
    """The paired difference of the two compared candidates, per metric."""
    comp = summary.get("comparison")
    if not comp:
        return []
    out = [
        f"<h2>{_h(comp['a'])} − {_h(comp['b'])} <span class='muted'>(paired, 95% CI)</span></h2>",
        "<table><tr><th>metric</th><th>difference</th><th>n</th></tr>",
    ]
    for metric in summary["metric_names"]:
        est = comp["metrics"][metric]
        out.append(
            f"<tr><td>{_h(label(metric))}</td><td class='num'>{_h(fmt_difference(est))}</td>"
            f"<td class='num'>{est['n']}</td></tr>"
        )
    out.append("</table>")
    return out


def _html_pairwise(summary: dict[str, Any]) -> list[str]:
    pair = summary.get("pairwise")
    if not pair:
        return []
    return [
        f"<h2>Pairwise judge: {_h(pair['a'])} vs {_h(pair['b'])}</h2>",
        f"<p>Asked in both orders; a win needs the same preference twice. <b>win {pair['win']} / tie "
        f"{pair['tie']} / loss {pair['loss']}</b>, no verdict for {pair['missing']}. Win rate of "
        f"{_h(pair['a'])} (tie = ½): {_h(fmt_estimate(pair['win_rate']))}.</p>",
    ]


def _html_failures(summary: dict[str, Any]) -> list[str]:
    facts, failed = failure_lines(summary)
    out = ["<h2>Failures</h2><ul>" + "".join(f"<li>{_h(line)}</li>" for line in facts) + "</ul>"]
    if failed:
        out.append("<ul class='muted'>" + "".join(f"<li>{_h(line)}</li>" for line in failed) + "</ul>")
    return out


def _html_worst(summary: dict[str, Any], worst: Sequence[dict[str, Any]]) -> list[str]:
    """The items where the first candidate lost most against the second, each side by side."""
    comp = summary.get("comparison")
    if not comp:
        return []
    out = [f"<h2>{_h(worst_title(summary))}</h2>"]
    if not worst:
        out.append(f"<p>{_h(no_worst_sentence(summary))}</p>")
    for w in worst:
        out += _html_worst_item(comp, w)
    return out


def _html_worst_item(comp: dict[str, Any], w: dict[str, Any]) -> list[str]:
    ra, rb = w["a"], w["b"]
    notes = []
    if w["lost_pairwise"]:
        notes.append("lost the pairwise judgement")
    if w["gap"] is not None:
        notes.append(f"{label(comp['ranking_metric'])} gap {w['gap']:.3f}")
    out = [
        f"<h3>Item {w['index']} — {_h(', '.join(notes))}</h3>",
        f"<p><b>Question:</b> {_h(ra['question'])}</p>",
        f"<table class='side'><tr><th>reference</th><th>{_h(comp['a'])}</th><th>{_h(comp['b'])}</th></tr>",
        f"<tr><td>{_h(ra['reference'])}</td><td>{_h(ra['answer'] or ra.get('answer_error') or '')}</td>"
        f"<td>{_h(rb['answer'] or rb.get('answer_error') or '')}</td></tr>",
    ]
    if ra.get("judge") or rb.get("judge"):
        out.append(
            f"<tr><td><i>judge</i></td><td>{_h(_judge_text(ra))}</td><td>{_h(_judge_text(rb))}</td></tr>"
        )
    out.append("</table>")
    return out


# ----------------------------------------------------------------------------------------- every item


def highlight(text: str, spans: Sequence[tuple[int, int]], css: str = "") -> str:
    """`text` escaped, with each span wrapped in <mark> (overlapping spans merged).

    >>> highlight("port <7300>", [(6, 10)])
    'port &lt;<mark>7300</mark>&gt;'
    """
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    out, pos = [], 0
    tag = f"<mark class='{css}'>" if css else "<mark>"
    for start, end in merged:
        out += [_h(text[pos:start]), tag, _h(text[start:end]), "</mark>"]
        pos = end
    out.append(_h(text[pos:]))
    return "".join(out)


def _fmt_value(metric: str, value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:g}" if metric in ("judge_score", "exact_match", "judge_yes") else f"{value:.3f}"


def _answer_cell(row: dict[str, Any], found: list[facts.Fact], metric_names: Sequence[str]) -> str:
    answer = row.get("answer")
    if answer is None:
        return f"<td><i>no answer: {_h(row.get('answer_error') or '')}</i></td>"
    hit = set(row.get("facts_hit") or [])
    spans = [span for f in found if f.text in hit for span in facts.fact_spans(f, answer)]
    metrics = row.get("metrics") or {}
    parts = []
    for metric in metric_names:
        value = metrics.get(metric)
        if metric == facts.KEY_FACTS:
            shown = f"{len(hit)} of {len(found)}" if found else "none in the reference"
            listed = f": {', '.join(f.text for f in found if f.text in hit)}" if hit else ""
            parts.append(f"{label(metric)} {shown}{listed}")
        else:
            parts.append(f"{label(metric)} {_fmt_value(metric, value)}")
    judge = _judge_text(row)
    if judge:
        parts.append(f"judge: {judge}")
    return f"<td>{highlight(answer, spans)}<div class='m'>{_h(' · '.join(parts))}</div></td>"


def _reference_spans(fact: facts.Fact, reference: str) -> list[tuple[int, int]]:
    """Where the reference states `fact`: as written where it was found ("6 euros" whole), and its other
    mentions."""
    at = reference.find(fact.text, fact.start)
    spans = facts.fact_spans(fact, reference)
    return [*spans, (at, at + len(fact.text))] if at >= 0 else spans


def items_table(summary: dict[str, Any], rows: Sequence[dict[str, Any]]) -> list[str]:
    """The table of every item: question, reference (key facts marked), each candidate's answer (facts it
    states marked) with its metrics, and the difference of two candidates, which the page's script sorts by."""
    cands = list(summary["candidates"])
    metric_names = summary["metric_names"]
    comp = summary.get("comparison") or {}
    a, b = comp.get("a", cands[0]), comp.get("b", cands[-1])
    by_item: dict[int, dict[str, dict[str, Any]]] = {}
    for row in rows:
        by_item.setdefault(row["index"], {})[row["candidate"]] = row
    options = "".join(f"<option value='{_h(m)}'>{_h(label(m))}</option>" for m in metric_names)

    def pick(name: str, chosen: str) -> str:
        opts = "".join(
            f"<option value='{_h(c)}'{' selected' if c == chosen else ''}>{_h(c)}</option>" for c in cands
        )
        return f"<select id='{name}'>{opts}</select>"

    out = [
        "<h2 id='items'>Every item side by side</h2>",
        "<p>Key facts of the reference are marked in it, and in each answer those it states. Sort by the "
        f"difference of <select id='sort-metric'>{options}</select> between {pick('sort-a', a)} and "
        f"{pick('sort-b', b)}: click the last column's header (again to reverse).</p>",
        "<table id='items-table' class='items'><thead><tr><th>#</th><th>question</th><th>reference</th>"
        + "".join(f"<th>{_h(c)}</th>" for c in cands)
        + "<th id='sort-diff' class='sortable' role='button' tabindex='0' aria-sort='none'>difference: "
        f"<span id='diff-label'>{_h(label(metric_names[0]))}: {_h(a)} − {_h(b)}</span> "
        "<span id='sort-arrow'>⇅</span></th></tr></thead><tbody>",
    ]
    for index in sorted(by_item):
        item = by_item[index]
        first = next(iter(item.values()))
        found = facts.key_facts(first["reference"])
        ref_spans = [span for f in found for span in _reference_spans(f, first["reference"])]
        values = {c: (r.get("metrics") or {}) for c, r in item.items()}
        va, vb = values.get(a, {}).get(metric_names[0]), values.get(b, {}).get(metric_names[0])
        diff = f"{va - vb:+.3f}" if va is not None and vb is not None else "n/a"
        facts_note = f"key facts: {', '.join(f.text for f in found)}" if found else "no key facts"
        cells = "".join(
            _answer_cell(item[c], found, metric_names) if c in item else "<td></td>" for c in cands
        )
        out.append(
            f"<tr data-index='{index}' data-values='{_h(json.dumps(values, sort_keys=True))}'>"
            f"<td class='num'>{index}</td><td>{_h(first['question'])}</td>"
            f"<td>{highlight(first['reference'], ref_spans, 'fact')}<div class='m'>{_h(facts_note)}</div></td>"
            f"{cells}<td class='num diff'>{diff}</td></tr>"
        )
    out.append("</tbody></table>")
    return out
