"""Route plugins: the example `status` plugin pip-installed and mounted by a real
`engine serve` under /plugins/status/ (behind --api-key), driven with httpx and
the openai client; off unless named; broken or clashing plugins are refused by
name while the others mount."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import openai
import pytest

import registry
from engine.entrypoints.api_server import ServerSettings, build_app
from engine.entrypoints.route_plugins import RoutePluginError, mount_route_plugins, served_routes

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "status-route-plugin"
API_KEY = "route-key-1"


@pytest.fixture(scope="module")
def installed_example(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("status-routes-site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(EXAMPLE)],
        check=True, capture_output=True, timeout=300,
    )
    return target


def _paths(app) -> set[str]:
    return {path for _, path in served_routes(app)}


def _settings(**kw) -> ServerSettings:
    return ServerSettings(model_name="tiny", **kw)


# ------------------------------------------------------------------ selection


def test_route_plugins_are_off_unless_named(monkeypatch):
    monkeypatch.setenv("ENGINE_PLUGIN_DIRS", str(EXAMPLE))
    assert not any(p.startswith("/plugins/") for p in _paths(build_app(_settings())))
    named = build_app(_settings(route_plugins=("status",)))
    assert {"/plugins/status/summary", "/plugins/status/complete"} <= _paths(named)
    effects = [e for e in registry.effects() if e["kind"] == "api_route"]
    assert effects[-1]["plugin"] == "status" and effects[-1]["target"] == "/plugins/status/"


def test_a_positive_engine_plugins_entry_enables_and_a_negative_one_wins(monkeypatch):
    monkeypatch.setenv("ENGINE_PLUGIN_DIRS", str(EXAMPLE))
    monkeypatch.setenv("ENGINE_PLUGINS", "api_route:status")
    assert "/plugins/status/summary" in _paths(build_app(_settings()))
    monkeypatch.setenv("ENGINE_PLUGINS", "-status")
    assert "/plugins/status/summary" not in _paths(build_app(_settings(route_plugins=("status",))))


def test_an_unknown_route_plugin_name_is_refused_naming_the_known_ones(monkeypatch):
    monkeypatch.setenv("ENGINE_PLUGIN_DIRS", str(EXAMPLE))
    with pytest.raises(RoutePluginError, match=r"--enable-route-plugin nope: no api_route plugin.*status"):
        build_app(_settings(route_plugins=("nope",)))


def _plugin_dir(tmp_path: Path, entries: dict[str, str], body: str) -> Path:
    folder = tmp_path / "routes"
    folder.mkdir()
    (folder / "more_routes.py").write_text(textwrap.dedent(body))
    lines = "\n".join(f'{name} = "{value}"' for name, value in entries.items())
    (folder / "pyproject.toml").write_text(
        '[project]\nname = "more-routes"\nversion = "0.1"\n\n'
        f'[project.entry-points."engine.api_route_plugins"]\n{lines}\n')
    return folder


BROKEN = """
from fastapi import APIRouter

good = APIRouter()

@good.get("/ping")
def ping():
    return {"pong": True}

def not_a_router():
    return 42

clash = APIRouter()

@clash.get("/ping")
def ping_again():
    return {}
"""


def test_broken_and_clashing_plugins_are_left_out_by_name_and_the_others_mount(
    tmp_path, monkeypatch, caplog
):
    folder = _plugin_dir(tmp_path, {"good": "more_routes:good", "bad": "more_routes:not_a_router",
                                    "weird": "more_routes:good"}, BROKEN)
    monkeypatch.setenv("ENGINE_PLUGIN_DIRS", str(folder))
    app = build_app(_settings(route_plugins=("good", "bad")))
    assert "/plugins/good/ping" in _paths(app)
    assert "route plugin 'bad'" in caplog.text and "returned int, not a fastapi.APIRouter" in caplog.text
    # a second mount of the same routes would shadow the ones the app has
    with pytest.raises(RoutePluginError, match=r"route plugin 'good'.*GET /plugins/good/ping would shadow"):
        monkeypatch.setenv("ENGINE_STRICT_PLUGINS", "1")
        mount_route_plugins(app, ("good",))


# ------------------------------------------------------------------ a real server


@pytest.fixture(scope="module")
def server(installed_example, make_hf_model, tmp_path_factory):
    from test_serve import Server

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PYTHONPATH", str(installed_example))
        srv = Server(["--model", str(make_hf_model("llama")), "--dtype", "float32",
                      "--served-model-name", "tiny", "--api-key", API_KEY,
                      "--enable-route-plugin", "status"],
                     tmp_path_factory.mktemp("routes-config"),
                     tmp_path_factory.mktemp("routes-log") / "server.log")
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


def test_the_example_route_plugin_serves_behind_the_api_key(server):
    url = f"{server.url}/plugins/status/summary"
    assert httpx.get(url, timeout=30).status_code == 401
    assert httpx.get(url, headers={"Authorization": "Bearer wrong"}, timeout=30).status_code == 401
    response = httpx.get(url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert response.status_code == 200, response.text
    summary = response.json()
    assert summary["state"] == "ready" and summary["max_model_len"] == 1024
    assert summary["num_unfinished_requests"] == 0


def test_a_plugin_route_generates_what_the_openai_route_does(server):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    prompt = "def add(a, b):"
    plugin = httpx.post(f"{server.url}/plugins/status/complete", headers=headers, timeout=60,
                        json={"prompt": prompt, "max_tokens": 6})
    assert plugin.status_code == 200, plugin.text
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    expected = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0)
    assert plugin.json()["text"] == expected.choices[0].text
    bad = httpx.post(f"{server.url}/plugins/status/complete", headers=headers, timeout=60,
                     json={"prompt": "", "max_tokens": 2})
    assert bad.status_code == 400 and "empty" in bad.text
    plugins = client.get("/plugins", cast_to=object)
    rows = plugins["data"] if isinstance(plugins, dict) and "data" in plugins else plugins
    assert "/plugins/status/" in str(rows)
