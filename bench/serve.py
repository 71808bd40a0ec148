"""Does `doctune serve` batch? 32 concurrent clients vs the same requests served one at a time.

For each model size (the tiny and the small `doctune tiny-model`), in one run:

  one at a time   plain `model.generate` in this process, one request after another, greedy: what a naive
                  server does. Its time to first token counts the wait behind the requests before it, as if all
                  had arrived at once.
  doctune serve   `doctune serve` in its own process; C clients (official AsyncOpenAI, streaming) each send
                  R requests one after another. Time to first token is measured by the client.

Both sides answer the same requests (same chat-templated prompts, greedy, same max_tokens). Target: the server's
completion-token throughput >= 3x one-at-a-time. TTFT p50/p95 reported.

    .venv/bin/python bench/serve.py [--clients 32] [--rounds 2] [--max-tokens 64] [--sizes tiny,small]

Prints a table and writes bench/results/serve.json. The clients share the machine's cores with the server;
numbers measured while other work loads the CPU are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

RESULTS = ROOT / "bench" / "results" / "serve.json"
TOPICS = ["chunks", "the teacher", "curation", "LoRA", "evaluation", "the adapter", "tokens", "serving"]


def questions(n: int) -> list[list[dict[str, str]]]:
    return [
        [
            {
                "role": "user",
                "content": f"Question {i}: what does part {i % 7} of the handbook say about {TOPICS[i % 8]}?",
            }
        ]
        for i in range(n)
    ]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# ---------------------------------------------------------------- baseline: one request at a time


def one_at_a_time(
    model_dir: Path, conversations: list[list[dict[str, str]]], max_tokens: int, threads: int
) -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.generation.streamers import BaseStreamer

    from doctune.serve.models import ServedModel, render_prompt

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    served = ServedModel("base", "__base__", str(model_dir), None, None)

    class FirstToken(BaseStreamer):
        def __init__(self) -> None:
            self.calls = 0
            self.at: float | None = None

        def put(self, value: Any) -> None:
            self.calls += 1
            if self.calls == 2 and self.at is None:  # the first call is the prompt
                self.at = time.perf_counter()

        def end(self) -> None:
            pass

    def generate(conversation: list[dict[str, str]]) -> tuple[int, float | None]:
        ids = torch.tensor([render_prompt(tokenizer, served, conversation)])
        streamer = FirstToken()
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_tokens,
                do_sample=False,
                streamer=streamer,
            )
        return out.shape[1] - ids.shape[1], streamer.at

    generate(conversations[0])  # warm-up
    started = time.perf_counter()
    tokens, ttft = 0, []
    for conversation in conversations:
        n, first_at = generate(conversation)
        tokens += n
        ttft.append((first_at or time.perf_counter()) - started)  # waited behind every earlier request
    wall = time.perf_counter() - started
    label = f"one at a time (model.generate), {threads} thr"
    return summarize(label, len(conversations), tokens, wall, ttft)


# ---------------------------------------------------------------- doctune serve + concurrent clients


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    model_dir: Path, port: int, max_batch: int, threads: int, log_path: Path
) -> subprocess.Popen:
    command = [sys.executable, "-m", "doctune", "serve", "--model", str(model_dir)]
    command += ["--served-model-name", "bench", "--port", str(port)]
    command += ["--max-batch", str(max_batch), "--threads", str(threads)]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=log_path.parent)
    import httpx

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"doctune serve exited: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("doctune serve did not start in 300 s")


async def clients(port: int, conversations: list[list[dict[str, str]]], n_clients: int, max_tokens: int):
    import openai

    client = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="bench", max_retries=0, timeout=600
    )
    work = list(conversations)
    ttft: list[float] = []
    tokens = 0

    async def ask(conversation: list[dict[str, str]]) -> None:
        nonlocal tokens
        sent = time.perf_counter()
        first = None
        stream = await client.chat.completions.create(
            model="bench",
            messages=conversation,
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter()
            if chunk.usage is not None:
                tokens += chunk.usage.completion_tokens
        ttft.append((first or time.perf_counter()) - sent)

    async def client_loop() -> None:
        while work:
            await ask(work.pop(0))

    await asyncio.gather(*(ask(c) for c in conversations[:4]))  # warm-up
    ttft.clear()
    tokens = 0
    started = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(n_clients)))
    wall = time.perf_counter() - started
    await client.close()
    return tokens, wall, ttft


def served(
    model_dir: Path, conversations, n_clients: int, max_tokens: int, max_batch: int, threads: int, work: Path
) -> dict[str, Any]:
    port = free_port()
    log_path = work / f"serve-{model_dir.name}-{max_batch}.log"
    process = start_server(model_dir, port, max_batch, threads, log_path)
    try:
        tokens, wall, ttft = asyncio.run(clients(port, conversations, n_clients, max_tokens))
    finally:
        process.terminate()
        process.wait(30)
    label = f"doctune serve, {n_clients} clients, {threads} thr" + ("" if max_batch > 1 else ", batch 1")
    return summarize(label, len(conversations), tokens, wall, ttft)


def summarize(label: str, requests: int, tokens: int, wall: float, ttft: list[float]) -> dict[str, Any]:
    return {
        "mode": label,
        "requests": requests,
        "completion_tokens": tokens,
        "wall_s": round(wall, 3),
        "requests_per_s": round(requests / wall, 2),
        "tokens_per_s": round(tokens / wall, 1),
        "ttft_p50_s": round(statistics.median(ttft), 3),
        "ttft_p95_s": round(percentile(ttft, 0.95), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="requests per client")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--sizes", default="tiny,small")
    parser.add_argument(
        "--unbatched-server", action="store_true", help="also run the server with --max-batch 1"
    )
    parser.add_argument("--work", type=Path, default=None, help="folder for models and server logs (kept)")
    args = parser.parse_args()

    import torch

    from doctune.tinymodel import build_tiny_model

    conversations = questions(args.clients * args.rounds)
    default = torch.get_num_threads()
    threads = max(1, (os.cpu_count() or 1) - 1)  # what `doctune serve` uses on the CPU by default
    load_before = os.getloadavg()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="doctune-bench-serve-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for size in args.sizes.split(","):
            model_dir = work / size
            build_tiny_model(model_dir, size=size, seed=0)
            # The baseline runs with torch's default threads and with the server's; the ratio is to the faster.
            rows = [
                one_at_a_time(model_dir, conversations, args.max_tokens, t)
                for t in sorted({default, threads})
            ]
            base = max(row["tokens_per_s"] for row in rows)
            for max_batch in [args.clients, 1] if args.unbatched_server else [args.clients]:
                rows.append(
                    served(model_dir, conversations, args.clients, args.max_tokens, max_batch, threads, work)
                )
            for row in rows:
                row["throughput_vs_one_at_a_time"] = round(row["tokens_per_s"] / base, 2)
            results[size] = rows

    header = (
        f"{'model':6} {'mode':46} {'req':>4} {'tokens':>7} {'wall s':>7} {'tok/s':>8} {'x':>6} "
        f"{'TTFT p50':>9} {'p95':>7}"
    )
    print(header)
    print("-" * len(header))
    for size, rows in results.items():
        for r in rows:
            print(
                f"{size:6} {r['mode']:46} {r['requests']:>4} {r['completion_tokens']:>7} {r['wall_s']:>7.2f} "
                f"{r['tokens_per_s']:>8.1f} {r['throughput_vs_one_at_a_time']:>6.2f} {r['ttft_p50_s']:>9.3f} "
                f"{r['ttft_p95_s']:>7.3f}"
            )
    report = {
        "benchmark": "serve",
        "command": "bench/serve.py " + " ".join(sys.argv[1:]),
        "clients": args.clients,
        "requests_per_client": args.rounds,
        "max_tokens": args.max_tokens,
        "target": "doctune serve tokens/s >= 3x one at a time (the faster of its two thread settings)",
        "results": results,
        "machine": {
            "cpus": os.cpu_count(),
            "torch_default_threads": default,
            "server_threads": threads,
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "note": "clients and server share the machine's cores; other processes may have loaded the CPU",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
