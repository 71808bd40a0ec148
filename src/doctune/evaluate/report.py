"""Human reports of an eval: report.md and a self-contained report.html (chart embedded as a PNG, every piece of
model text escaped), plus the rows of the summary table the CLI prints.

Everything here is a pure function of summary.json's content and the result rows.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from typing import Any

LABELS = {
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
    cands = list(summary["candidates"])
    lines = ["# doctune eval report", "", *_header_lines(summary), ""]
    lines += ["## Metrics (mean [95% bootstrap CI], n items)", ""]
    lines += ["| metric | " + " | ".join(cands) + " |", "|---|" + "---|" * len(cands)]
    for metric in summary["metric_names"]:
        cells = [
            f"{fmt_estimate(summary['metrics'][c].get(metric))} n={summary['metrics'][c][metric]['n']}"
            for c in cands
        ]
        lines.append(f"| {label(metric)} | " + " | ".join(cells) + " |")
    comp = summary.get("comparison")
    if comp:
        lines += ["", f"## {comp['a']} − {comp['b']} (paired difference per item, 95% CI)", ""]
        lines += ["| metric | difference | n |", "|---|---|---|"]
        for metric in summary["metric_names"]:
            est = comp["metrics"][metric]
            lines.append(f"| {label(metric)} | {fmt_difference(est)} | {est['n']} |")
    pair = summary.get("pairwise")
    if pair:
        lines += ["", f"## Pairwise judge: {pair['a']} vs {pair['b']}", ""]
        lines.append(
            f"Asked in both orders; a win needs the same preference twice. **win {pair['win']} / tie "
            f"{pair['tie']} / loss {pair['loss']}**, no verdict for {pair['missing']}. "
            f"Win rate of {pair['a']} (tie = ½): {fmt_estimate(pair['win_rate'])}."
        )
    facts, failed = failure_lines(summary)
    lines += [
        "",
        "## Failures",
        "",
        *(f"- {line}" for line in facts),
        *(f"  - {_md_cell(x)}" for x in failed),
    ]
    if comp:
        lines += ["", f"## Where {comp['a']} lost most against {comp['b']}", ""]
        if not worst:
            lines.append(f"No item where {comp['a']} scored below {comp['b']}.")
        for w in worst:
            ra, rb = w["a"], w["b"]
            gap = f"{label(comp['ranking_metric'])} gap {w['gap']:.3f}" if w["gap"] is not None else ""
            lost = "lost the pairwise judgement" if w["lost_pairwise"] else ""
            lines += [f"### Item {w['index']} — " + ", ".join(x for x in (lost, gap) if x), ""]
            lines += [f"**Question:** {_md_cell(ra['question'])}", ""]
            lines += [f"| reference | {comp['a']} | {comp['b']} |", "|---|---|---|"]
            lines.append(
                f"| {_md_cell(ra['reference'])} | {_md_cell(ra['answer'] or ra.get('answer_error'))} "
                f"| {_md_cell(rb['answer'] or rb.get('answer_error'))} |"
            )
            if ra.get("judge") or rb.get("judge"):
                lines.append(f"| *judge* | {_md_cell(_judge_text(ra))} | {_md_cell(_judge_text(rb))} |")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


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
        items.append(f"… {len(listed) - 50} more in results.jsonl")
    return facts, items


# ----------------------------------------------------------------------------------------- html

_CSS = """
body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1200px;padding:0 1rem;color:#222}
table{border-collapse:collapse;margin:.5rem 0 1.5rem}td,th{border:1px solid #ccc;padding:.3rem .6rem;
vertical-align:top;text-align:left}th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.side td{width:33%;white-space:pre-wrap}img{max-width:100%}code{background:#f3f3f3;padding:0 .2rem}
.muted{color:#777}
"""


def _h(text: Any) -> str:
    return html.escape(str(text), quote=True)


def render_html(summary: dict[str, Any], worst: Sequence[dict[str, Any]], chart_png: bytes | None) -> str:
    """A single self-contained page: no external assets, every model-written string escaped."""
    cands = list(summary["candidates"])
    dec = summary["decoding"]
    judge = summary.get("judge")
    out = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8"><title>doctune eval report</title>',
        f"<style>{_CSS}</style></head><body>",
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
    out.append("</ul><h2>Metrics <span class='muted'>(mean [95% bootstrap CI], n items)</span></h2>")
    out.append("<table><tr><th>metric</th>" + "".join(f"<th>{_h(c)}</th>" for c in cands) + "</tr>")
    for metric in summary["metric_names"]:
        cells = "".join(
            f"<td class='num'>{_h(fmt_estimate(summary['metrics'][c].get(metric)))} "
            f"<span class='muted'>n={summary['metrics'][c][metric]['n']}</span></td>"
            for c in cands
        )
        out.append(f"<tr><td>{_h(label(metric))}</td>{cells}</tr>")
    out.append("</table>")
    if chart_png:
        data = base64.b64encode(chart_png).decode("ascii")
        out.append(f"<img alt='metrics per candidate with 95% CI' src='data:image/png;base64,{data}'>")
    comp = summary.get("comparison")
    if comp:
        out.append(f"<h2>{_h(comp['a'])} − {_h(comp['b'])} <span class='muted'>(paired, 95% CI)</span></h2>")
        out.append("<table><tr><th>metric</th><th>difference</th><th>n</th></tr>")
        for metric in summary["metric_names"]:
            est = comp["metrics"][metric]
            out.append(
                f"<tr><td>{_h(label(metric))}</td><td class='num'>{_h(fmt_difference(est))}</td>"
                f"<td class='num'>{est['n']}</td></tr>"
            )
        out.append("</table>")
    pair = summary.get("pairwise")
    if pair:
        out.append(f"<h2>Pairwise judge: {_h(pair['a'])} vs {_h(pair['b'])}</h2>")
        out.append(
            f"<p>Asked in both orders; a win needs the same preference twice. <b>win {pair['win']} / tie "
            f"{pair['tie']} / loss {pair['loss']}</b>, no verdict for {pair['missing']}. Win rate of "
            f"{_h(pair['a'])} (tie = ½): {_h(fmt_estimate(pair['win_rate']))}.</p>"
        )
    facts, failed = failure_lines(summary)
    out.append("<h2>Failures</h2><ul>" + "".join(f"<li>{_h(line)}</li>" for line in facts) + "</ul>")
    if failed:
        out.append("<ul class='muted'>" + "".join(f"<li>{_h(line)}</li>" for line in failed) + "</ul>")
    if comp:
        out.append(f"<h2>Where {_h(comp['a'])} lost most against {_h(comp['b'])}</h2>")
        if not worst:
            out.append(f"<p>No item where {_h(comp['a'])} scored below {_h(comp['b'])}.</p>")
        for w in worst:
            ra, rb = w["a"], w["b"]
            notes = []
            if w["lost_pairwise"]:
                notes.append("lost the pairwise judgement")
            if w["gap"] is not None:
                notes.append(f"{label(comp['ranking_metric'])} gap {w['gap']:.3f}")
            out.append(f"<h3>Item {w['index']} — {_h(', '.join(notes))}</h3>")
            out.append(f"<p><b>Question:</b> {_h(ra['question'])}</p>")
            out.append(
                f"<table class='side'><tr><th>reference</th><th>{_h(comp['a'])}</th><th>{_h(comp['b'])}</th></tr>"
            )
            out.append(
                f"<tr><td>{_h(ra['reference'])}</td><td>{_h(ra['answer'] or ra.get('answer_error') or '')}</td>"
                f"<td>{_h(rb['answer'] or rb.get('answer_error') or '')}</td></tr>"
            )
            if ra.get("judge") or rb.get("judge"):
                out.append(
                    f"<tr><td><i>judge</i></td><td>{_h(_judge_text(ra))}</td><td>{_h(_judge_text(rb))}</td></tr>"
                )
            out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"
