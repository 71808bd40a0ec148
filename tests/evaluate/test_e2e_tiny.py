"""`doctune eval` on the tiny model: the base against an adapter from `doctune finetune`, judge on loopback."""

import json
from pathlib import Path

import pytest
import yaml
from tests.support.fake_openai import FakeOpenAIServer
from typer.testing import CliRunner

from doctune.cli import app
from doctune.config import load_config
from doctune.runs import read_jsonl

SYSTEM_PROMPT = "You answer questions about Lumen Notes, briefly."
QA = [(f"Which port does service {k} use?", f"Service {k} listens on port {7000 + k}.") for k in range(28)]
EVAL = QA[24:]


def judge(request):
    user = request["messages"][-1]["content"]
    if "Answer A:" in user:
        return {"reason": "A is shorter.", "winner": "A" if len(user) % 2 else "B"}
    return {"reason": "Not the reference.", "score": 1 + len(user) % 4}


@pytest.fixture(scope="module")
def tuned_run(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A config whose run_dir holds an adapter written by the finetune stage on the tiny model."""
    from doctune.finetune.train import run as finetune

    root = tmp_path_factory.mktemp("eval-e2e")
    run_dir = root / "run"
    run_dir.mkdir()

    def conv(q: str, a: str) -> str:
        roles = (("system", SYSTEM_PROMPT), ("user", q), ("assistant", a))
        return json.dumps({"messages": [{"role": r, "content": c} for r, c in roles]}) + "\n"

    (run_dir / "train.jsonl").write_text("".join(conv(q, a) for q, a in QA[:20]), encoding="utf-8")
    (run_dir / "val.jsonl").write_text("".join(conv(q, a) for q, a in QA[20:24]), encoding="utf-8")
    # the seed's format: a JSON list of {"question", "answer"}
    (root / "eval_set.json").write_text(
        json.dumps([{"question": q, "answer": a} for q, a in EVAL]), encoding="utf-8"
    )
    tiny = {"backend": "hf", "model": str(tiny_model_dir), "max_concurrency": 8}
    raw = {
        "run_dir": "run",
        "models": {"tiny": tiny, "teacher": tiny, "student": tiny, "judge": tiny},
        "curate": {"system_prompt": "not the prompt used in training"},
        "finetune": {
            "model": "tiny",
            "epochs": 1,
            "batch_size": 4,
            "lr": 1e-3,
            "max_length": 128,
            "report_to": [],
        },
        "eval": {
            "judge": "judge",
            "max_tokens": 24,
            "candidates": {
                "finetuned": {"model": "tiny", "adapter": "{run_dir}/adapter"},
                "base": {"model": "tiny"},
            },
        },
    }
    config = root / "doctune.yaml"
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    finetune(load_config(config))
    return config, raw


@pytest.mark.slow
def test_eval_of_a_finetuned_adapter_against_its_base(tuned_run):
    config, raw = tuned_run
    with FakeOpenAIServer(reply=judge, models=["judge-model"]) as srv:
        raw["models"]["judge"] = {
            "backend": "openai",
            "base_url": srv.base_url,
            "model": "judge-model",
            "api_key_env": None,
        }
        config.write_text(yaml.safe_dump(raw), encoding="utf-8")
        args = ["eval", "-c", str(config), "--eval-set", "eval_set.json", "--pairwise", "finetuned,base"]
        out = config.parent / "run" / "eval"
        first = CliRunner().invoke(app, args)
        assert first.exit_code == 0, first.output
        asked, first_summary = srv.total_requests(), (out / "summary.json").read_bytes()
        again = CliRunner().invoke(app, args)
        assert again.exit_code == 0, again.output
        assert srv.total_requests() == asked  # answers and verdicts all came from the cache
        assert (out / "summary.json").read_bytes() == first_summary

    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    rows = read_jsonl(out / "results.jsonl")
    assert {p.name for p in out.iterdir()} >= {"results.jsonl", "summary.json", "report.md", "report.html"}
    assert len(rows) == 2 * len(EVAL) and all(r["answer"] is not None for r in rows)
    assert summary["system_prompt"] == SYSTEM_PROMPT
    assert summary["system_prompt_source"].endswith("adapter/doctune_finetune.json")
    assert summary["candidates"]["finetuned"]["adapter"].endswith("adapter")
    assert summary["metrics"]["finetuned"]["judge_score"]["n"] == len(EVAL)
    pair = summary["pairwise"]
    assert pair["win"] + pair["tie"] + pair["loss"] == len(EVAL)
    # the adapter changes what the model writes
    answers = {(r["candidate"], r["index"]): r["answer"] for r in rows}
    assert any(answers[("finetuned", i)] != answers[("base", i)] for i in range(len(EVAL)))
    assert "judge score (1-10) · finetuned" in first.output and "wrote" in first.output
