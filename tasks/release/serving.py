"""Serve a release through vLLM's OpenAI-compatible server (``tuneline serve``).

What is here: the verified local copy of a release (downloaded once into a cache, re-verified when
reused), the vLLM python to run (vLLM lives in its own venv: docs/vllm-cpu.md), and :class:`Engine`:
one ``vllm.entrypoints.openai.api_server`` process serving the release's ``model/`` folder under the
release's model name, with the release's own chat template, health-checked with a real chat request.
The owner (``with``) stops its whole process group, as :class:`tasks.runtime.vllm_cpu.VLLMServer` does.

The entry is ``python -m vllm.entrypoints.openai.api_server`` (the server ``vllm serve`` runs) because
the ``vllm`` CLI looks up the distribution ``vllm``, which the CPU build (``vllm-cpu``) is not; on a GPU
worker the same module of the CUDA build serves.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from tasks.artifacts.registry import LATEST, MANIFEST, latest_release
from tasks.artifacts.store import Store, safe_key, sha256_file
from tasks.release.ops import ReleaseError, fetch_release, load_manifest
from tasks.runtime.vllm_cpu import DEFAULT_VENV, VLLMServer

QUESTION = "Who are you?"
INSTALL_HINT = "python -m tasks.runtime.vllm_cpu ensure-venv"


class ServeError(RuntimeError):
    """Something a user can fix (no vLLM, no merged model in the release, an engine that does not answer)."""


def default_cache() -> Path:
    return Path(os.environ.get("TUNELINE_SERVE_CACHE") or Path.home() / ".cache" / "tuneline" / "releases")


def resolve(store: Store, model: str, release_id: str) -> str:
    """``LATEST`` -> the release id it names (a ``ReleaseError`` before the first release); any other id
    must be a complete release (a mistyped one: one line naming the newest complete ids)."""
    if release_id != LATEST:
        load_manifest(store, model, release_id)  # unknown or incomplete: ReleaseError with the ids that exist
        return release_id
    rid = latest_release(store, model)
    if rid is None:
        raise ReleaseError(f"no release of {model!r} at {store.where()} ({LATEST} is missing)")
    return rid


def _verified(copy: Path, manifest: dict[str, Any]) -> bool:
    """True when ``copy`` holds every file of ``manifest`` with its size and SHA-256."""
    try:
        if json.loads((copy / MANIFEST).read_text())["files"] != manifest["files"]:
            return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    for rel, entry in manifest["files"].items():
        path = copy / safe_key(rel)
        if not path.is_file() or path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
            return False
    return True


def local_copy(store: Store, model: str, release_id: str, cache: Path, log=print) -> tuple[Path, dict[str, Any]]:
    """The verified copy of a release under ``cache``: reused when every file still matches the store's
    manifest, else downloaded again (``fetch_release`` verifies every SHA-256 and keeps nothing on a
    mismatch). Returns (folder, manifest)."""
    from tasks.artifacts.registry import read_manifest

    manifest, _ = read_manifest(store, model, release_id)
    copy = Path(cache) / safe_key(model) / safe_key(release_id)
    if copy.exists():
        log(f"checking the copy of {model}/{release_id} in {copy} against its manifest ...")
        if _verified(copy, manifest):
            log(f"reusing {copy}: every SHA-256 verified")
            return copy, manifest
        log(f"{copy} does not match the release any more; downloading it again")
        shutil.rmtree(copy)
    size = sum(e["size"] for e in manifest["files"].values())
    log(f"downloading {model}/{release_id} from {store.where()} into {copy} ({size / 1e6:.1f} MB) ...")
    manifest = fetch_release(store, model, release_id, copy)
    log(f"fetched {len(manifest['files'])} files, every SHA-256 verified")
    return copy, manifest


def model_folder(copy: Path, manifest: dict[str, Any]) -> Path:
    """The merged model of a release copy; a ``ServeError`` when the release has none."""
    folder = copy / "model"
    if not (folder / "config.json").is_file():
        raise ServeError(
            f"release {manifest.get('model_name')}/{manifest.get('release_id')} has no merged model "
            "(model/config.json): it was released without merged weights "
            "(release.include_merged) or pruned; serve another release"
        )
    return folder


def vllm_python(explicit: str | None = None) -> str:
    """The python that has vLLM: ``--vllm-python``, else ``TUNELINE_VLLM_PYTHON``, else the default vLLM venv
    (.venv-vllm), else this python when it imports vllm. ``ServeError`` (one line, with the install command)
    when there is none."""
    import importlib.util

    for candidate, origin in (
        (explicit, "--vllm-python"),
        (os.environ.get("TUNELINE_VLLM_PYTHON"), "TUNELINE_VLLM_PYTHON"),
    ):
        if candidate:
            if not Path(candidate).is_file():
                raise ServeError(f"{origin} {candidate} does not exist; create a vLLM venv with `{INSTALL_HINT}`")
            return candidate
    default = DEFAULT_VENV / "bin" / "python"
    if default.is_file():
        return str(default)
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    raise ServeError(
        f"vLLM is not installed: no --vllm-python, no TUNELINE_VLLM_PYTHON, no {DEFAULT_VENV}, and this python "
        f"({sys.executable}) has no vllm; install it with `{INSTALL_HINT}` (CPU build, ≈3 min)"
    )


def chat_template(folder: Path) -> Path | None:
    """The release's own chat template file, when it ships one as a file (else the tokenizer_config's is used)."""
    path = folder / "chat_template.jinja"
    return path if path.is_file() else None


class Engine(VLLMServer):
    """One vLLM OpenAI-compatible server for a release folder, run by ``python`` (the vLLM venv's).

    ``with Engine(folder, log, python=..., name=...) as engine: engine.base_url``. ``port`` None: a free
    private port (behind the follow-latest proxy); else the user's ``host``/``port``."""

    def __init__(
        self,
        model_dir: Path,
        log_path: Path,
        *,
        python: str,
        name: str,
        release_id: str = "",
        host: str = "127.0.0.1",
        port: int | None = None,
        max_model_len: int | None = None,
        dtype: str = "auto",
        enforce_eager: bool = True,
        start_timeout: float = 900.0,
    ):
        super().__init__(
            model_dir, log_path, dtype=dtype, enforce_eager=enforce_eager, start_timeout=start_timeout, stop_timeout=30
        )
        self.python, self.name, self.release_id, self.host = python, name, release_id, host
        self.max_model_len = max_model_len
        if port is not None:
            self.port = port
        connect = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        self.base_url = f"http://{connect}:{self.port}"

    def command(self) -> tuple[list[str], dict[str, str]]:
        env = dict(os.environ)
        if shutil.which("nvidia-smi") is None:  # the CPU build's settings (docs/vllm-cpu.md §3)
            env.setdefault("VLLM_TARGET_DEVICE", "cpu")
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
            env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})  # the release folder is all it may read
        cmd = [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model_dir]
        cmd += ["--served-model-name", self.name, "--host", self.host, "--port", str(self.port), "--dtype", self.dtype]
        template = chat_template(Path(self.model_dir))
        if template is not None:
            cmd += ["--chat-template", str(template)]
        if self.max_model_len:
            cmd += ["--max-model-len", str(self.max_model_len)]
        if self.enforce_eager:
            cmd += ["--enforce-eager"]
        return cmd, env

    def ask(self, question: str = QUESTION, max_tokens: int = 32, timeout: float = 300) -> str:
        """A real chat request (the health check that counts): the answer's text; ``ServeError`` without one."""
        import httpx

        body = {"model": self.name, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens}
        body["temperature"] = 0
        try:
            r = httpx.post(f"{self.base_url}/v1/chat/completions", json=body, timeout=timeout)
            r.raise_for_status()
            text = r.json()["choices"][0]["message"]["content"] or ""
        except (httpx.HTTPError, ValueError, KeyError, IndexError) as e:
            raise ServeError(f"the engine for {self.name}/{self.release_id} gave no answer: {type(e).__name__}: {e}")
        if not text.strip():
            raise ServeError(f"the engine for {self.name}/{self.release_id} answered {question!r} with nothing")
        return text.strip()

    def version(self) -> str:
        try:
            import httpx

            return httpx.get(f"{self.base_url}/version", timeout=10).json().get("version", "?")
        except Exception:  # noqa: BLE001 - the startup line only
            return "?"


def start_engine(
    store: Store,
    model: str,
    release_id: str,
    *,
    cache: Path,
    python: str,
    log_dir: Path,
    log=print,
    on_started: Any = None,
    **engine_kwargs: Any,
) -> tuple[Engine, str]:
    """Copy (or reuse) and verify the release, start its engine, ask it the identity question.
    Returns (the started engine, its answer); on any failure the engine is stopped. ``on_started(engine)``
    is called before the engine process starts (so that an owner can stop it while it loads)."""
    copy, manifest = local_copy(store, model, release_id, cache, log=log)
    folder = model_folder(copy, manifest)
    log_path = Path(log_dir) / f"vllm-{safe_key(model)}-{safe_key(release_id)}-{time.strftime('%H%M%S')}.log"
    engine = Engine(folder, log_path, python=python, name=model, release_id=release_id, **engine_kwargs)
    if on_started is not None:
        on_started(engine)
    try:
        engine.start()
        answer = engine.ask()
    except BaseException:
        engine.stop()
        raise
    return engine, answer
