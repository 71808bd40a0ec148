"""The chat page at GET /, in a real headless browser: Debian's chromium driven by Playwright.

Needs /usr/bin/chromium (scripts/install-browser.sh) and the playwright package. Without them the test is
skipped with the reason, except under CI (CI set), where it fails: CI must run it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import openai
import pytest

from doctune.serve.app import create_app

from .helpers import running

CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
KEY = "sk-page-test-1234"


def chromium_path() -> str:
    path = shutil.which("chromium") or "/usr/bin/chromium"
    missing = []
    if not Path(path).exists():
        missing.append("Debian's chromium (run scripts/install-browser.sh as root)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright package (pip install -r requirements.txt)")
    if missing:
        reason = "the browser test needs " + " and ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; under CI it must run, not skip")
        pytest.skip(reason)
    return path


@pytest.fixture(scope="module")
def browser():
    executable = chromium_path()
    from playwright.sync_api import sync_playwright

    # Playwright starts chromium headless with a fresh, temporary --user-data-dir of its own.
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_FLAGS)
        yield chromium
        chromium.close()


COUNT_UPDATES = """() => {
    window.__updates = 0;
    new MutationObserver(() => {
        const replies = document.querySelectorAll('.msg.assistant');
        if (replies.length && replies[replies.length - 1].textContent) window.__updates += 1;
    }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
}"""


def ask_on_page(page, question, max_tokens):
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#prompt", question)
    page.click("#send")
    reply = page.locator(".msg.assistant").last
    page.wait_for_selector(".msg.assistant:last-child[data-done='true']", timeout=60_000)
    return reply.text_content()


@pytest.mark.slow
def test_the_page_streams_an_answer_and_keeps_the_conversation(browser, server, tmp_path):
    api = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
    page = browser.new_page()
    page.goto(server.url + "/")
    page.wait_for_function("document.querySelectorAll('#model option').length === 3")
    assert page.input_value("#model") == "docs"  # the first adapter is picked
    page.evaluate(COUNT_UPDATES)

    question = "What does the handbook say about chunks?"
    shown = ask_on_page(page, question, max_tokens=48)
    expected = api.chat.completions.create(
        model="docs", messages=[{"role": "user", "content": question}], max_tokens=48, temperature=0
    )
    assert shown == expected.choices[0].message.content
    assert page.evaluate("window.__updates") >= 2  # the answer appeared piece by piece
    assert page.locator(".msg.user").first.text_content() == question

    page.select_option("#model", "tiny")
    follow_up = "And what about the adapter?"
    shown_second = ask_on_page(page, follow_up, max_tokens=16)
    history = [
        {"role": "user", "content": question},
        {"role": "assistant", "content": shown},
        {"role": "user", "content": follow_up},
    ]
    expected_second = api.chat.completions.create(
        model="tiny", messages=history, max_tokens=16, temperature=0
    )
    assert shown_second == expected_second.choices[0].message.content

    page.screenshot(path=str(tmp_path / "chat.png"))
    page.click("#reset")
    assert page.locator(".msg").count() == 0
    page.close()


@pytest.mark.slow
def test_the_page_works_behind_an_api_key(browser, engine):
    with running(create_app(engine, api_key=KEY)) as srv:
        anonymous = browser.new_context()
        challenge = anonymous.request.get(srv.url + "/")
        assert challenge.status == 401 and challenge.headers["www-authenticate"].startswith("Basic")
        anonymous.close()

        context = browser.new_context(http_credentials={"username": "me", "password": KEY})
        page = context.new_page()
        assert page.goto(srv.url + "/").status == 200
        page.wait_for_function("document.querySelectorAll('#model option').length === 3")
        assert ask_on_page(page, "Hello?", max_tokens=6)
        assert page.locator(".msg.error").count() == 0
        context.close()
