"""The chat page in a real headless Chromium (Debian's ``chromium``, driven by Playwright: no
browser download) against real ``llmserve run`` servers with the demo model.

Each test saves a screenshot; the folder is printed (``pytest -s``) and is
``$LLMSERVE_TEST_ARTIFACTS`` when set, else a pytest temporary folder."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Page, expect, sync_playwright
from playwright.sync_api import TimeoutError as PlaywrightTimeout

from tests.conftest import ServerProcess
from tests.polling import wait_until

# a browser, a server and a model share the machine's cores: a wider bound than the default
pytestmark = [pytest.mark.real, pytest.mark.timeout(180)]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
API_KEY = "sk-webui-test"
# SmolLM2-135M keeps counting far past what a test waits for: Stop is what ends this answer
LONG_PROMPT = "Count from 1 to 1000, one number per line, with no other text."
UI_TIMEOUT_MS = 60_000  # the machine is shared: generous, but bounded
# One llama.cpp thread: where other processes load the cores, llama.cpp's spinning threads slow
# each other down (15 vs 1.1 tokens/s measured here with 1 and 2 threads at load 12).
THREADS = ("--threads", "1")
expect.set_options(timeout=UI_TIMEOUT_MS)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, timeout=60_000)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = os.environ.get("LLMSERVE_TEST_ARTIFACTS")
    path = Path(folder) if folder else tmp_path_factory.mktemp("webui-screenshots")
    path.mkdir(parents=True, exist_ok=True)
    print(f"\nchat page screenshots: {path}")
    return path


class Console:
    """The console errors and uncaught exceptions of a page."""

    def __init__(self, page: Page) -> None:
        self.errors: list[str] = []
        page.on("console", self._message)
        page.on("pageerror", lambda exc: self.errors.append(f"uncaught: {exc}"))

    def _message(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(message.text)


@pytest.fixture
def open_page(browser: Browser) -> Iterator[Callable[..., Page]]:
    contexts = []

    def open_page(server: ServerProcess, *, width: int = 1280, height: int = 800) -> Page:
        context = browser.new_context(viewport={"width": width, "height": height})
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(UI_TIMEOUT_MS)
        return page

    yield open_page
    for context in contexts:
        context.close()


def url(server: ServerProcess) -> str:
    return f"http://127.0.0.1:{server.port}/"


@pytest.fixture(scope="module")
def server(start_server: Callable[..., ServerProcess]) -> ServerProcess:
    return start_server("--parallel", "1", *THREADS)


def slots(server: ServerProcess, key: str | None = None) -> list[dict[str, Any]]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = httpx.get(f"{url(server)}slots", headers=headers, timeout=10)
    r.raise_for_status()
    result: list[dict[str, Any]] = r.json()
    return result


def shoot(page: Page, path: Path) -> None:
    page.screenshot(path=str(path), animations="disabled")


def wait_for_models(page: Page) -> None:
    expect(page.locator("#model")).to_be_enabled()


def ask(page: Page, text: str) -> None:
    page.locator("#prompt").fill(text)
    page.locator("#prompt").press("Enter")


def rendered(markdown: Any) -> str:
    """What an answer's markdown element holds, as HTML. Not its text: a streamed answer can
    render to elements with no text of their own (an empty list item "1. ", a rule "---")."""
    return str(markdown.evaluate("e => e.innerHTML")).strip()


def stop_while_streaming(page: Page, server: ServerProcess, stop: Callable[[], None]) -> Any:
    """Ask for a long answer and ``stop`` it while it streams; returns the answer's element. The
    demo model sometimes ends a "long" answer on its own within a moment: then nothing was
    stopped (Stop is gone once an answer ends), so ask again, at most three times."""
    for _ in range(3):
        before = page.locator(".message.assistant").count()
        ask(page, LONG_PROMPT)
        # this question's answer by its place (`.last` could still be the previous answer)
        answer = page.locator(".message.assistant").nth(before).locator(".markdown")
        wait_until(lambda a=answer: rendered(a) != "", timeout=60,
                   what="the answer to start streaming")
        try:
            stop()
            expect(page.locator(".message.assistant").last.locator(".notice")).to_have_text(
                "Stopped.", timeout=5_000)
        except (PlaywrightTimeout, AssertionError):
            expect(page.locator("#send")).to_be_visible()  # it had ended by itself
            continue
        return answer
    pytest.fail("three answers in a row ended before Stop could be pressed")


def set_setting(page: Page, name: str, value: str) -> None:
    page.locator("#open-settings").click()
    page.get_by_label(name, exact=True).fill(value)
    page.locator("#close-settings").click()


# The text lengths an answer passed through while it was still streaming (aria-busy="true").
RECORD_STREAM = """() => {
  window.streamLengths = [];
  new MutationObserver(() => {
    const answer = document.querySelector('.message.assistant[aria-busy="true"] .markdown');
    if (answer) window.streamLengths.push(answer.textContent.length);
  }).observe(document.getElementById('messages'), {subtree: true, childList: true,
                                                     characterData: true, attributes: true});
}"""


def test_a_question_streams_an_answer_with_no_console_errors(
    server: ServerProcess, open_page: Callable[..., Page], artifacts: Path,
) -> None:
    page = open_page(server)
    console = Console(page)
    page.goto(url(server))
    wait_for_models(page)
    set_setting(page, "Max tokens", "32")
    page.evaluate(RECORD_STREAM)
    ask(page, "Write a Python function that adds two numbers.")
    answer = page.locator(".message.assistant").last
    stats = answer.locator(".stats")
    expect(stats).to_contain_text("tokens/s")
    expect(stats).to_contain_text("cached")
    assert answer.locator(".markdown").inner_text().strip()
    lengths: list[int] = page.evaluate("window.streamLengths")
    partial = {n for n in lengths if n > 0}
    assert len(partial) >= 3, f"the answer did not arrive in pieces: {lengths}"
    expect(page.locator("#send")).to_be_visible()
    expect(page.locator("#stop")).to_be_hidden()
    expect(page.get_by_role("status").filter(has_text="Answer")).to_have_text("Answer finished.")
    # the conversation is kept in the browser and listed
    expect(page.locator("#conversations li")).to_have_count(1)
    expect(page.locator("#conversations")).to_contain_text("Write a Python function")
    stored = page.evaluate("JSON.parse(localStorage.getItem('llmserve.conversations'))")
    assert [m["role"] for m in stored[0]["messages"]] == ["user", "assistant"]
    shoot(page, artifacts / "chat.png")
    # a new visit starts a new chat; the saved one opens from the list
    page.reload()
    wait_for_models(page)
    expect(page.locator(".message")).to_have_count(0)
    page.locator("#conversations li .conversation-open").click()
    expect(page.locator(".message")).to_have_count(2)
    assert console.errors == []


def test_stop_aborts_the_answer_and_frees_the_slot(
    server: ServerProcess, open_page: Callable[..., Page], artifacts: Path,
) -> None:
    page = open_page(server)
    console = Console(page)
    page.goto(url(server))
    wait_for_models(page)
    set_setting(page, "Max tokens", "1500")
    answer = stop_while_streaming(page, server,
                                  lambda: page.locator("#stop").click(timeout=2_000))
    stopped_at = time.monotonic()
    wait_until(lambda: not slots(server)[0]["is_processing"], timeout=10,
               what="the slot to be freed after Stop")
    assert time.monotonic() - stopped_at < 10
    expect(page.locator("#announce")).to_have_text("Answer stopped.")
    expect(page.locator("#send")).to_be_visible()
    html = rendered(answer)
    assert html  # what had streamed stays on the page
    # nothing arrives after Stop, and the server's slot stays idle
    assert not slots(server)[0]["is_processing"]
    assert rendered(answer) == html
    shoot(page, artifacts / "stopped.png")
    assert console.errors == []


def test_escape_stops_the_answer(server: ServerProcess, open_page: Callable[..., Page]) -> None:
    page = open_page(server)
    page.goto(url(server))
    wait_for_models(page)
    set_setting(page, "Max tokens", "1500")
    stop_while_streaming(page, server, lambda: page.keyboard.press("Escape"))
    wait_until(lambda: not slots(server)[0]["is_processing"], timeout=10, what="a free slot")


def test_shift_enter_is_a_new_line_and_samplers_reach_the_request(
    server: ServerProcess, open_page: Callable[..., Page],
) -> None:
    page = open_page(server)
    page.goto(url(server))
    wait_for_models(page)
    page.locator("#open-settings").click()
    page.get_by_label("System prompt").fill("Answer in one word.")
    for label, value in (("Temperature", "0"), ("Top p", "0.9"), ("Top k", "20"),
                         ("Min p", "0.05"), ("Max tokens", "3")):
        page.get_by_label(label, exact=True).fill(value)
    page.locator("#close-settings").click()
    prompt = page.locator("#prompt")
    prompt.fill("first line")
    prompt.press("Shift+Enter")
    prompt.press_sequentially("second line")
    assert prompt.input_value() == "first line\nsecond line"
    with page.expect_request("**/v1/chat/completions") as request:
        prompt.press("Enter")
    body = request.value.post_data_json
    assert body["messages"] == [{"role": "system", "content": "Answer in one word."},
                                {"role": "user", "content": "first line\nsecond line"}]
    assert (body["temperature"], body["top_p"], body["top_k"], body["min_p"],
            body["max_tokens"]) == (0, 0.9, 20, 0.05, 3)
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    expect(page.locator(".message.assistant .stats")).to_contain_text("3 tokens")
    # the settings are kept for the next visit
    page.reload()
    expect(page.get_by_label("Max tokens", exact=True)).to_have_value("3")


def test_the_model_picker_lists_and_loads_models(
    start_server: Callable[..., ServerProcess], demo_model: Path, tmp_path: Path,
    open_page: Callable[..., Page],
) -> None:
    for name in ("first-model", "second-model"):
        (tmp_path / f"{name}.gguf").symlink_to(demo_model)
    server = start_server("--models-dir", str(tmp_path), *THREADS)
    listed = httpx.get(f"{url(server)}v1/models", timeout=10).json()["data"]
    states = {m["id"]: m["state"] for m in listed}
    assert sorted(states) == ["first-model", "second-model"]
    unloaded = next(model for model, state in states.items() if state != "loaded")
    page = open_page(server)
    page.goto(url(server))
    wait_for_models(page)
    values = page.locator("#model option").evaluate_all("os => os.map(o => o.value)")
    assert sorted(values) == sorted(states)
    option = page.locator(f"#model option[value='{unloaded}']")
    expect(option).to_contain_text("not loaded")
    page.locator("#model").select_option(unloaded)  # picking it loads it (JIT)
    expect(page.locator("#model-status")).to_have_text(f"{unloaded} is loaded")
    expect(option).to_have_text(unloaded)
    states = {m["id"]: m["state"] for m in
              httpx.get(f"{url(server)}v1/models", timeout=10).json()["data"]}
    assert states[unloaded] == "loaded"
    set_setting(page, "Max tokens", "4")
    ask(page, "Hello")
    expect(page.locator(".message.assistant .model-name")).to_have_text(unloaded)
    expect(page.locator(".message.assistant .stats")).to_contain_text("tokens")


def test_the_page_asks_for_the_api_key_and_then_works(
    start_server: Callable[..., ServerProcess], open_page: Callable[..., Page], artifacts: Path,
) -> None:
    server = start_server("--api-key", API_KEY, *THREADS)
    page = open_page(server)
    page.goto(url(server))
    key_form = page.locator("#key-form")
    expect(key_form).to_be_visible()
    expect(key_form).to_contain_text("needs an API key")
    shoot(page, artifacts / "api-key.png")
    page.get_by_label("API key", exact=True).fill("sk-wrong")
    page.get_by_role("button", name="Use this key").click()
    expect(key_form).to_contain_text("refused the saved API key")
    page.get_by_label("API key", exact=True).fill(API_KEY)
    page.get_by_role("button", name="Use this key").click()
    expect(key_form).to_be_hidden()
    wait_for_models(page)
    set_setting(page, "Max tokens", "4")
    ask(page, "Hello")
    expect(page.locator(".message.assistant .stats")).to_contain_text("tokens")
    assert page.evaluate("JSON.parse(localStorage.getItem('llmserve.apiKey'))") == API_KEY
    # the key is remembered: a new visit works without asking
    page.reload()
    wait_for_models(page)
    expect(key_form).to_be_hidden()


def test_a_refused_request_shows_the_servers_message(
    server: ServerProcess, open_page: Callable[..., Page], artifacts: Path,
) -> None:
    page = open_page(server)
    page.goto(url(server))
    wait_for_models(page)
    set_setting(page, "Max tokens", "999999")
    ask(page, "Hello there")
    error = page.locator("#error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("refused the request (400)")
    expect(error).to_contain_text("context")
    # the question is given back to send again, and no empty answer is left behind
    expect(page.locator("#prompt")).to_have_value("Hello there")
    expect(page.locator(".message")).to_have_count(0)
    shoot(page, artifacts / "error.png")


def test_a_rate_limited_request_says_when_to_retry(
    start_server: Callable[..., ServerProcess], open_page: Callable[..., Page],
) -> None:
    server = start_server("--rate-limit", "1/minute", "--rate-burst", "1", *THREADS)
    page = open_page(server)
    page.goto(url(server))  # the page's files are not counted; its model list takes the one
    wait_for_models(page)
    ask(page, "Hello")
    error = page.locator("#error")
    expect(error).to_contain_text("Too many requests (429)")
    expect(error).to_contain_text("Try again in")


def test_usable_at_phone_width(server: ServerProcess, open_page: Callable[..., Page],
                               artifacts: Path) -> None:
    page = open_page(server, width=390, height=800)
    page.goto(url(server))
    wait_for_models(page)
    expect(page.locator("#sidebar")).to_be_hidden()
    no_overflow = "document.documentElement.scrollWidth <= window.innerWidth"
    assert page.evaluate(no_overflow)
    set_setting(page, "Max tokens", "8")
    ask(page, "Hello")
    expect(page.locator(".message.assistant .stats")).to_contain_text("tokens")
    assert page.evaluate(no_overflow)
    page.locator("#open-sidebar").click()
    expect(page.get_by_role("button", name="+ New chat")).to_be_visible()
    expect(page.locator("#conversations li")).to_have_count(1)
    shoot(page, artifacts / "phone.png")
    page.mouse.click(370, 400)  # beside the list, over the chat
    expect(page.locator("#sidebar")).to_be_hidden()


def sse(*events: dict[str, Any]) -> str:
    return "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"


def chunk(delta: dict[str, str], **extra: Any) -> dict[str, Any]:
    return {"object": "chat.completion.chunk", "choices": [
        {"index": 0, "delta": delta, "finish_reason": extra.pop("finish_reason", None)}], **extra}


@pytest.mark.parametrize("reasoning", ["reasoning_content", "think-tags"])
def test_reasoning_shows_collapsed_and_markdown_renders_safely(
    server: ServerProcess, open_page: Callable[..., Page], reasoning: str,
) -> None:
    """The page's rendering of what a reasoning model streams (the demo model does not reason:
    this stream is scripted in the browser, the page and its model list are the real server's)."""
    answer = ("## Result\n\nA **bold** claim, `code`, [a link](https://example.org/) and "
              "[not a link](javascript:alert(1)) <script>alert(2)</script>\n\n"
              "- one\n- two\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n"
              "```python\ndef f(x):\n    return x  # done\n```\n")
    thought = "The user wants an example."
    if reasoning == "think-tags":
        deltas = [{"content": "<think>" + thought[:10]}, {"content": thought[10:] + "</think>\n"}]
    else:
        deltas = [{"reasoning_content": thought[:10]}, {"reasoning_content": thought[10:]}]
    body = sse(
        chunk({"role": "assistant", "content": ""}), *(chunk(d) for d in deltas),
        *(chunk({"content": answer[i:i + 40]}) for i in range(0, len(answer), 40)),
        chunk({}, finish_reason="stop", timings={"predicted_n": 30, "predicted_per_second": 42.5,
                                                 "cache_n": 12}),
        {"object": "chat.completion.chunk", "choices": [], "usage": {
            "prompt_tokens": 20, "completion_tokens": 30, "total_tokens": 50,
            "prompt_tokens_details": {"cached_tokens": 12}}},
    )
    page = open_page(server)
    console = Console(page)
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"}, body=body))
    page.goto(url(server))
    wait_for_models(page)
    ask(page, "Show me markdown")
    message = page.locator(".message.assistant")
    expect(message.locator(".stats")).to_contain_text("30 tokens · 42.5 tokens/s · 12 cached")
    details = message.locator("details.reasoning")
    expect(details).to_have_count(1)
    assert details.get_attribute("open") is None  # collapsed
    expect(details.locator(".reasoning-text")).to_be_hidden()
    details.locator("summary").click()
    expect(details.locator(".reasoning-text")).to_have_text(thought)
    markdown = message.locator(".markdown")
    expect(markdown.locator("h3")).to_have_text("Result")  # the page has the h1
    expect(markdown.locator("strong")).to_have_text("bold")
    expect(markdown.locator("a")).to_have_count(1)
    assert markdown.locator("a").get_attribute("href") == "https://example.org/"
    expect(markdown).to_contain_text("<script>alert(2)</script>")  # shown as text, not run
    expect(markdown.locator("script")).to_have_count(0)
    expect(markdown.locator("li")).to_have_count(2)
    expect(markdown.locator("td")).to_have_text(["1", "2"])
    code = markdown.locator("pre code")
    expect(code).to_have_text("def f(x):\n    return x  # done")
    expect(code.locator(".tok-keyword")).to_have_text(["def", "return"])
    expect(code.locator(".tok-comment")).to_have_text("# done")
    assert "think" not in markdown.inner_text()
    assert console.errors == []


def test_an_error_in_the_stream_is_shown_under_the_answer(
    server: ServerProcess, open_page: Callable[..., Page],
) -> None:
    body = sse(chunk({"role": "assistant", "content": ""}), chunk({"content": "Partial"}),
               {"error": {"message": "the model failed", "type": "server_error"}})
    page = open_page(server)
    page.route("**/v1/chat/completions", lambda route: route.fulfill(
        status=200, headers={"Content-Type": "text/event-stream"}, body=body))
    page.goto(url(server))
    wait_for_models(page)
    ask(page, "Hello")
    message = page.locator(".message.assistant")
    expect(message.locator(".message-error")).to_contain_text("the model failed")
    expect(message.locator(".markdown")).to_have_text("Partial")
