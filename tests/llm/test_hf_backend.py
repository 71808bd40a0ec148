import asyncio
import json
import re
import time
from pathlib import Path

import pytest
import torch

from doctune.config import ModelConfig
from doctune.errors import LLMError
from doctune.llm.base import LLM, RequestFailed
from doctune.llm.engine import GrammarMasks
from doctune.llm.grammar import generation_safe_schema
from doctune.llm.hf_backend import HFBackend

QUESTIONS = [
    "What is the tank volume?",
    "How often should the filter be cleaned?",
    "Quelle est la température par défaut ?",
    "What does alarm E05 mean?",
    "Wie lange dauert der Zyklus?",
    "Which refrigerant is used?",
    "水箱的容量是多少？",
    "Is the warranty valid without maintenance?",
]
CONVERSATIONS = [
    [{"role": "system", "content": "Answer from the manual."}, {"role": "user", "content": q}]
    for q in QUESTIONS
]
PAIRS_SCHEMA = {
    "type": "object",
    "properties": {
        "pairs": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "properties": {"question": {"type": "string"}, "answer": {"type": "string"}},
                "required": ["question", "answer"],
            },
        },
        "grounded": {"type": "boolean"},
    },
    "required": ["pairs", "grounded"],
}


def run(coro):
    return asyncio.run(coro)


def gather(llm, conversations, **params):
    async def go():
        return await asyncio.gather(*(llm.chat(m, **params) for m in conversations))

    return run(go())


def one_at_a_time(llm, conversations, **params):
    async def go():
        return [await llm.chat(m, **params) for m in conversations]

    return run(go())


def llm_model_dir(llm: HFBackend) -> Path:
    return Path(llm.model_path)


def backend(model_dir: Path, batch: int = 8, adapter: Path | None = None) -> HFBackend:
    return HFBackend(ModelConfig(backend="hf", model=str(model_dir), max_concurrency=batch), adapter=adapter)


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return backend(tiny_model_dir)


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter with random (non-zero) B matrices: it changes what the model writes."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    torch.manual_seed(1)
    lora = LoraConfig(r=4, lora_alpha=16, target_modules="all-linear", init_lora_weights=False)
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    get_peft_model(model, lora).save_pretrained(out)
    return out


def test_implements_the_llm_protocol(llm, tiny_model_dir):
    assert isinstance(llm, LLM)
    assert llm.name == f"hf:{tiny_model_dir}"


def test_batched_greedy_outputs_equal_one_at_a_time(llm):
    before = dict(llm.stats)
    together = gather(llm, CONVERSATIONS, max_tokens=24)
    assert (
        llm.stats["batches"] == before["batches"] + 1
    )  # all eight prefilled together, then decoded together
    alone = one_at_a_time(llm, CONVERSATIONS, max_tokens=24)
    assert [c.text for c in together] == [c.text for c in alone]
    assert len({c.text for c in together}) > 1  # the prompts really differ
    assert [c.prompt_tokens for c in together] == [c.prompt_tokens for c in alone]
    assert all(c.prompt_tokens > 10 and 0 < c.completion_tokens <= 24 for c in together)


def test_generation_runs_off_the_event_loop(llm):
    async def go():
        reply = asyncio.ensure_future(llm.chat(CONVERSATIONS[0], max_tokens=200))
        loop_ran_while_generating = False
        while not reply.done():
            await asyncio.sleep(0.001)
            loop_ran_while_generating |= llm.stats.get("steps", 0) > 0 and llm._engine.pending() > 0
        return loop_ran_while_generating, reply.result()

    loop_ran, reply = run(go())
    assert loop_ran and reply.completion_tokens > 0


def test_batches_hold_at_most_max_concurrency_rows(tiny_model_dir):
    small = backend(tiny_model_dir, batch=3)
    replies = gather(small, CONVERSATIONS, max_tokens=4)
    assert len(replies) == 8
    assert small.stats["rows"] == 8 and small.stats["largest_batch"] == 3


def test_requests_with_different_parameters_share_a_batch_and_keep_their_own(llm):
    async def go():
        short = [llm.chat(m, max_tokens=3) for m in CONVERSATIONS[:4]]
        long = [llm.chat(m, max_tokens=9) for m in CONVERSATIONS[4:]]
        return await asyncio.gather(*short, *long)

    before = dict(llm.stats)
    replies = run(go())
    assert llm.stats["batches"] == before["batches"] + 1  # one prefill for all eight
    for reply, limit in zip(replies, [3] * 4 + [9] * 4, strict=True):
        assert reply.completion_tokens <= limit
        assert reply.finish_reason == "stop" or reply.completion_tokens == limit
    alone = one_at_a_time(llm, CONVERSATIONS[:4], max_tokens=3) + one_at_a_time(
        llm, CONVERSATIONS[4:], max_tokens=9
    )
    assert [r.text for r in replies] == [r.text for r in alone]


def assert_answers_as_generate_alone(llm, conversations, limits) -> list:
    """Send every conversation at once (each with its max_tokens) and assert each reply is what transformers'
    own greedy `generate` writes for that prompt alone, the end-of-turn token left out. Returns the replies."""

    async def go():
        return await asyncio.gather(
            *(llm.chat(m, max_tokens=n) for m, n in zip(conversations, limits, strict=True))
        )

    replies = run(go())
    loaded = llm._loaded
    for messages, limit, reply in zip(conversations, limits, replies, strict=True):
        ids = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        out = loaded.model.generate(
            torch.tensor([ids]), max_new_tokens=limit, do_sample=False, eos_token_id=sorted(loaded.eos_ids)
        )
        expected = out[0, len(ids) :].tolist()
        if (
            expected[-1] in loaded.eos_ids
        ):  # generate alone stops at the end of turn: only the last can be one
            expected = expected[:-1]
        assert reply.text == loaded.tokenizer.decode(expected, skip_special_tokens=True)
    return replies


def test_continuous_batching_gives_model_generates_greedy_answers(llm):
    """Rows refilled as others finish (batch of 3, eight requests of different lengths) write exactly what
    transformers' own `generate` writes for each prompt alone."""
    small = backend(llm_model_dir(llm), batch=3)
    assert_answers_as_generate_alone(small, CONVERSATIONS, [4, 30, 7, 30, 2, 16, 30, 5])
    assert small.stats["batches"] > 1 and small.stats["largest_batch"] == 3  # newcomers joined running rows
    run(small.aclose())


def test_max_tokens_is_respected_with_finish_reason_length(llm):
    replies = gather(llm, CONVERSATIONS, max_tokens=5)
    assert any(r.finish_reason == "length" for r in replies)
    for reply in replies:
        assert reply.completion_tokens <= 5
        if reply.finish_reason == "length":
            assert reply.completion_tokens == 5


def test_stop_strings_cut_each_row_where_the_string_first_appears(llm):
    reference = gather(llm, CONVERSATIONS, max_tokens=40)
    full = reference[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip() and "\ufffd" not in stop
    replies = gather(llm, CONVERSATIONS, max_tokens=40, stop=[stop])
    for ref, reply in zip(reference, replies, strict=True):
        if stop in ref.text:
            assert reply.text == ref.text[: ref.text.index(stop)]
            assert reply.finish_reason == "stop"
            assert reply.completion_tokens < ref.completion_tokens
        else:
            assert reply.text == ref.text
    assert replies[0].finish_reason == "stop"


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_concurrent_schema_constrained_calls_return_valid_json(llm, temperature):
    schema = generation_safe_schema(PAIRS_SCHEMA, max_string_chars=16, max_items=2)
    replies = gather(llm, CONVERSATIONS, max_tokens=300, json_schema=schema, temperature=temperature)
    for reply in replies:
        assert reply.finish_reason == "stop", reply
        value = json.loads(reply.text)  # strict: no control characters inside strings
        assert set(value) == {"pairs", "grounded"} and isinstance(value["grounded"], bool)
        assert 1 <= len(value["pairs"]) <= 2
        for pair in value["pairs"]:
            assert set(pair) == {"question", "answer"}
            assert all(isinstance(v, str) and 1 <= len(v) <= 16 for v in pair.values())
            assert all("\ufffd" not in v for v in pair.values())  # valid UTF-8 (llm/grammar.py TokenGuard)
        assert list(value) == ["pairs", "grounded"]  # properties come in the schema's order


def test_token_guard_keeps_special_tokens_and_broken_utf8_out_of_constrained_text(tiny_model_dir):
    from transformers import AutoTokenizer

    from doctune.llm.grammar import SchemaGrammars

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    eot, pad = tok.convert_tokens_to_ids("<|eot_id|>"), tok.convert_tokens_to_ids("<|pad|>")
    guard = SchemaGrammars(tok, vocab_size=len(tok), stop_token_ids=[eot]).guard
    byte_token = {raw: i for i, raw in enumerate(guard.token_bytes) if len(raw) == 1}
    never = set(guard.never.tolist())
    assert pad in never and eot not in never
    assert byte_token[b"\xc0"] in never and byte_token[b"\xff"] in never  # never valid in UTF-8
    assert byte_token[b"a"] not in never and byte_token[b"\x87"] not in never

    scores = torch.zeros(1, len(tok))
    guard.mask(scores, 0, b'"x\xf0')  # after F0 the next byte must be 90-BF (87 would be an overlong form)
    assert scores[0, byte_token[b"\x87"]] == float("-inf") and scores[0, byte_token[b"\x90"]] == 0
    scores = torch.zeros(1, len(tok))
    guard.mask(scores, 0, b'"x\xc3')
    assert scores[0, byte_token[b"\x87"]] == 0


@pytest.mark.slow
def test_sampled_constrained_strings_keep_their_pattern_after_decoding(llm):
    pattern = '^[^\\x00-\\x1f"\\\\]{1,30}$'
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "string", "pattern": pattern},
            "b": {"type": "string", "pattern": pattern},
        },
        "required": ["a", "b"],
    }
    conversations = [[{"role": "user", "content": f"Question {i}"}] for i in range(64)]
    replies = gather(llm, conversations, max_tokens=200, json_schema=schema, temperature=1.5)
    for reply in replies:
        value = json.loads(reply.text)
        for text in value.values():
            assert re.fullmatch(pattern[1:-1], text) and "\ufffd" not in text, repr(text)


def test_sampled_replies_are_the_same_on_every_run(tiny_model_dir):
    conversations = [[{"role": "user", "content": f"Tell me about vaults {i}."}] for i in range(4)]
    replies = []
    for _ in range(2):
        fresh = backend(tiny_model_dir)
        replies.append([r.text for r in gather(fresh, conversations, max_tokens=12, temperature=1.0)])
        run(fresh.aclose())
    assert replies[0] == replies[1]
    greedy = [r.text for r in gather(backend(tiny_model_dir), conversations, max_tokens=12)]
    assert replies[0] != greedy  # it did sample


def test_generation_safe_schema_bounds_strings_and_arrays():
    safe = generation_safe_schema(
        {
            "type": "object",
            "properties": {
                "a": {"type": "string", "maxLength": 10},
                "b": {"type": "string", "enum": ["x", "y"]},
                "c": {"type": "array", "items": {"$ref": "#/$defs/s"}, "minItems": 5},
            },
            "$defs": {"s": {"type": "string"}},
        },
        max_string_chars=50,
        max_items=4,
    )
    assert safe["properties"]["a"] == {"type": "string", "pattern": '^[^\\x00-\\x1f"\\\\]{1,10}$'}
    assert safe["properties"]["b"] == {"type": "string", "enum": ["x", "y"]}
    assert safe["properties"]["c"]["maxItems"] == 5
    assert safe["$defs"]["s"]["pattern"].endswith("{1,50}$")


def test_an_adapter_changes_outputs_and_name(tiny_model_dir, adapter_dir, llm, tmp_path):
    tuned = backend(tiny_model_dir, adapter=adapter_dir)
    assert tuned.name.startswith(f"hf:{tiny_model_dir}+adapter@") and tuned.name != llm.name
    base_replies = gather(llm, CONVERSATIONS[:4], max_tokens=16)
    tuned_replies = gather(tuned, CONVERSATIONS[:4], max_tokens=16)
    assert [r.text for r in tuned_replies] != [r.text for r in base_replies]
    assert [r.text for r in tuned_replies] == [
        r.text for r in one_at_a_time(tuned, CONVERSATIONS[:4], max_tokens=16)
    ]

    from safetensors.torch import load_file, save_file

    retrained = tmp_path / "adapter"
    retrained.mkdir()
    (retrained / "adapter_config.json").write_bytes((adapter_dir / "adapter_config.json").read_bytes())
    weights = {k: v * 1.5 for k, v in load_file(adapter_dir / "adapter_model.safetensors").items()}
    save_file(weights, retrained / "adapter_model.safetensors")
    assert backend(tiny_model_dir, adapter=retrained).name != tuned.name


def test_a_failure_inside_generate_fails_the_batch_and_leaves_the_model_usable(
    tiny_model_dir, adapter_dir, monkeypatch
):
    tuned = backend(tiny_model_dir, adapter=adapter_dir)
    schema = generation_safe_schema(PAIRS_SCHEMA, max_string_chars=8, max_items=1)
    conversations = CONVERSATIONS[:4]
    expected = gather(tuned, conversations, max_tokens=150, json_schema=schema)

    original = GrammarMasks.__call__
    calls = {"n": 0}

    def fails_on_third_step(self, input_ids, scores):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected fault")
        return original(self, input_ids, scores)

    monkeypatch.setattr(GrammarMasks, "__call__", fails_on_third_step)

    async def go():
        return await asyncio.gather(
            *(tuned.chat(m, max_tokens=150, json_schema=schema) for m in conversations),
            return_exceptions=True,
        )

    failed = run(go())
    assert all(isinstance(f, RequestFailed) and "injected fault" in f.reason for f in failed)
    monkeypatch.setattr(GrammarMasks, "__call__", original)
    again = gather(tuned, conversations, max_tokens=150, json_schema=schema)
    assert [r.text for r in again] == [r.text for r in expected]
    assert all(r.finish_reason == "stop" for r in again)
    assert [r.text for r in gather(tuned, conversations, max_tokens=8)] != [
        r.text for r in gather(backend(tiny_model_dir), conversations, max_tokens=8)
    ]  # the adapter is still applied


def test_missing_model_folder_is_an_llm_error(tmp_path):
    missing = backend(tmp_path / "no-such-model")
    with pytest.raises(LLMError, match="no-such-model: folder does not exist") as err:
        run(missing.preflight())
    assert "\n" not in str(err.value)
    with pytest.raises(LLMError):  # chat() without preflight reports the same
        run(missing.chat(CONVERSATIONS[0], max_tokens=4))


def test_missing_or_broken_adapter_is_an_llm_error(tiny_model_dir, tmp_path):
    with pytest.raises(LLMError, match=r"no adapter_config\.json"):
        run(backend(tiny_model_dir, adapter=tmp_path / "nothing").preflight())
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(LLMError, match="cannot load") as err:
        run(backend(tiny_model_dir, adapter=broken).preflight())
    assert "\n" not in str(err.value)


def test_a_request_the_template_cannot_render_fails_alone(llm):
    async def go():
        bad = [{"role": "tool", "content": "x"}]
        return await asyncio.gather(
            llm.chat(bad, max_tokens=4), llm.chat(CONVERSATIONS[0], max_tokens=4), return_exceptions=True
        )

    bad, good = run(go())
    assert isinstance(bad, RequestFailed) and "chat template" in bad.reason
    assert good.completion_tokens > 0


def test_aclose_frees_the_model_and_a_later_call_loads_it_again(tiny_model_dir):
    llm = backend(tiny_model_dir)
    first = run(llm.chat(CONVERSATIONS[0], max_tokens=6))
    run(llm.aclose())
    assert llm._loaded is None
    assert run(llm.chat(CONVERSATIONS[0], max_tokens=6)) == first


def test_a_sampled_request_gets_the_same_reply_alone_or_beside_others(llm):
    conversation = [{"role": "user", "content": "Tell me about vaults."}]
    alone = run(llm.chat(conversation, max_tokens=16, temperature=1.0))
    beside = gather(llm, [conversation, *CONVERSATIONS[:5]], max_tokens=16, temperature=1.0)[0]
    assert beside.text == alone.text


def test_a_cancelled_call_frees_its_slot(tiny_model_dir):
    one_slot = backend(tiny_model_dir, batch=1)
    schema = {
        "type": "array",
        "items": {"type": "integer"},
        "minItems": 1000,
    }  # cannot end within 3000 tokens

    async def go():
        long = asyncio.ensure_future(one_slot.chat(CONVERSATIONS[0], max_tokens=3000, json_schema=schema))
        while one_slot.stats["steps"] < 5:
            await asyncio.sleep(0.005)
        long.cancel()
        started = time.monotonic()
        short = await one_slot.chat(CONVERSATIONS[1], max_tokens=4)  # needs the only slot
        return long, short, time.monotonic() - started

    long, short, waited = run(go())
    assert long.cancelled() and short.completion_tokens <= 4
    assert one_slot.stats["cancelled"] == 1 and one_slot.stats["steps"] < 1000 and waited < 10
    run(one_slot.aclose())


@pytest.mark.slow
def test_smollm2_answers_do_not_change_under_continuous_batching(smollm2_folder):
    """On the real model: eight requests of different lengths, four slots, each answer equal to `generate` alone."""
    llm = backend(smollm2_folder, batch=4)
    questions = ["What is the capital of France?", "Name a primary color.", "What is 2 + 2?", "Say hello."]
    conversations = [[{"role": "user", "content": q}] for q in questions * 2]
    replies = assert_answers_as_generate_alone(llm, conversations, [10, 16, 6, 12, 16, 6, 12, 8])
    assert "Paris" in replies[0].text
    assert llm.stats["batches"] > 1 and llm.stats["largest_batch"] == 4
    run(llm.aclose())
