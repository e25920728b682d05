"""The chat page's serving (fast tier): its files, their content types and security headers,
who may fetch them, and `--no-webui`. The page itself is driven in Chromium in
test_webui_real.py."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient
from typer.testing import CliRunner

from llmserve import cli
from llmserve.server.options import ServerOptions
from llmserve.server.routes.webui import CONTENT_SECURITY_POLICY
from tests.fakes import FakeEngine

CONTENT_TYPES = {
    "js": "text/javascript; charset=utf-8",
    "css": "text/css; charset=utf-8",
    "svg": "image/svg+xml",
}


@pytest.fixture
def page_client(make_app: Callable[..., Starlette], engine: FakeEngine) -> TestClient:
    return TestClient(make_app(engine), raise_server_exceptions=False)


def test_page_is_html_with_a_self_only_policy(page_client: TestClient) -> None:
    r = page_client.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    assert r.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert "default-src 'self'" in CONTENT_SECURITY_POLICY
    assert "unsafe" not in CONTENT_SECURITY_POLICY
    assert r.headers["x-content-type-options"] == "nosniff"
    assert '<script src="/webui/app.js"' in r.text


def test_every_file_the_page_loads_is_served_with_its_type(page_client: TestClient) -> None:
    html = page_client.get("/").text
    paths = set(re.findall(r'(?:src|href)="(/[^"]*)"', html))
    assert {"/webui/app.js", "/webui/markdown.js", "/webui/style.css", "/webui/icon.svg"} <= paths
    for path in paths:
        r = page_client.get(path)
        assert r.status_code == 200, path
        assert r.headers["content-type"] == CONTENT_TYPES[path.rpartition(".")[2]], path
        assert r.headers["content-security-policy"] == CONTENT_SECURITY_POLICY


def test_nothing_is_loaded_from_elsewhere(page_client: TestClient) -> None:
    """No CDN: the page must work offline (and its policy would block another origin anyway)."""
    for path in ("/", "/webui/app.js", "/webui/markdown.js", "/webui/style.css"):
        text = page_client.get(path).text
        assert not re.search(r"""["'(=]\s*(https?:)?//""", text), path


@pytest.mark.parametrize("path", [
    "/webui/nope.js", "/webui/__init__.py", "/webui/..%2f__init__.py", "/webui/",
], ids=["unknown", "python-source", "traversal", "folder"])
def test_other_paths_under_webui_are_404(page_client: TestClient, path: str) -> None:
    r = page_client.get(path)
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"


def test_head_answers_like_get(page_client: TestClient) -> None:
    r = page_client.head("/")
    assert r.status_code == 200
    assert r.content == b""


def test_page_needs_no_key_but_the_api_does(make_app: Callable[..., Starlette],
                                             engine: FakeEngine) -> None:
    app = make_app(engine, options=ServerOptions(api_keys=("sk-test",)))
    with TestClient(app, raise_server_exceptions=False) as c:
        assert c.get("/").status_code == 200
        assert c.get("/webui/app.js").status_code == 200
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer sk-test"}).status_code == 200


@pytest.mark.parametrize("keys", [(), ("sk-test",)], ids=["open", "with-key"])
def test_no_webui_leaves_root_as_before(make_app: Callable[..., Starlette], engine: FakeEngine,
                                        keys: tuple[str, ...]) -> None:
    """Without the page, GET / is no route's (404; 405 where a route answers only HEAD /, as
    Ollama's up-check does), or 401 first where a key is required."""
    app = make_app(engine, options=ServerOptions(api_keys=keys, webui=False))
    with TestClient(app, raise_server_exceptions=False) as c:
        for path in ("/", "/webui/app.js"):
            r = c.get(path)
            assert r.status_code in ((401,) if keys else (404, 405)), path
            assert "error" in r.json()


@pytest.mark.parametrize(("args", "env", "expected"), [
    ([], {}, True),
    (["--no-webui"], {}, False),
    ([], {"LLMSERVE_WEBUI": "0"}, False),
], ids=["default", "flag", "env"])
def test_no_webui_flag(monkeypatch: pytest.MonkeyPatch, args: list[str], env: dict[str, str],
                       expected: bool) -> None:
    seen = []
    monkeypatch.setattr(cli, "serve", lambda settings, **_: seen.append(settings))
    r = CliRunner().invoke(cli.app, ["run", "x.gguf", *args], env=env)
    assert r.exit_code == 0, r.output
    assert ServerOptions.from_settings(seen[0]).webui is expected


def test_run_help_lists_no_webui() -> None:
    r = CliRunner().invoke(cli.app, ["run", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    assert "--no-webui" in r.stdout
