"""Operate tuneline as a service: work pools, deployments, and a server + worker on one box.

    tuneline deploy --pool gpu-v100                        # pools, GPU tag limit, infra/prefect.yaml
    tuneline deploy --pool cpu --preset demo               # the offline demo as the nightly, CPU
    tuneline deploy --pool gpu-v100 --kind kubernetes      # cluster: pools from the Kubernetes template
    tuneline serve-local                                   # server + cpu worker on http://127.0.0.1:4200
    tuneline serve-local --pool gpu-v100 --worker gpu-v100:0 --worker gpu-v100:1   # one worker per GPU

Prefect does the work; this module only strings its pieces together in the order an operator
would type them (docs/operating.md):

1. work pools, one per hardware profile (``infra/work-pools.yaml``), from the base job template of
   the chosen kind (``infra/work-pools/process.json`` or ``kubernetes.json``), with a concurrency
   limit each, and the ``gpu`` tag limit that GPU-using task runs hold a slot of;
2. ``prefect deploy --all --prefect-file infra/prefect.yaml``, whose build step is
   ``deployment_values`` below (reads and validates the parameter preset);
3. for ``serve-local``: ``prefect server start`` on 127.0.0.1 and ``prefect worker start`` per
   pool (a GPU worker sees only its cards through ``CUDA_VISIBLE_DEVICES``).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
PREFECT_FILE = INFRA / "prefect.yaml"
POOLS_FILE = INFRA / "work-pools.yaml"
NIGHTLY_PRESET = INFRA / "presets" / "nightly.yaml"
PoolKind = Literal["process", "kubernetes"]


# ----------------------------------------------------------------------------------------------
# The build step of infra/prefect.yaml
# ----------------------------------------------------------------------------------------------
def deployment_values(preset: str | None = None, code_dir: str | None = None) -> dict[str, Any]:
    """``prefect deploy`` build step: the deployments' parameters and where the code lives.

    ``preset`` is a YAML file or a name in ``flows/presets`` (default ``infra/presets/nightly.yaml``);
    it is validated as ``RetrainParams`` here, so a typo fails the deploy, not the 01:30 run. The
    parameters are stored in full (every field), so the UI's Run form opens prefilled with them."""
    from flows.params import load_params

    params = load_params(preset or NIGHTLY_PRESET)
    code = Path(code_dir or REPO)
    return {"params": params.model_dump(mode="json"), "code_dir": str(code)}


# ----------------------------------------------------------------------------------------------
# Work pools and the GPU tag limit
# ----------------------------------------------------------------------------------------------
def load_pools(path: Path = POOLS_FILE) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def base_job_template(kind: PoolKind, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The kind's base job template with the pool's variable defaults (e.g. ``gpus``, ``node_selector``)."""
    template = json.loads((INFRA / "work-pools" / f"{kind}.json").read_text())
    props = template["variables"]["properties"]
    for key, value in (overrides or {}).items():
        if key not in props:
            raise ValueError(f"{POOLS_FILE}: {kind} template has no variable {key!r} (known: {', '.join(props)})")
        props[key]["default"] = value
    return template


def apply_work_pools(kind: PoolKind = "process", pools_file: Path = POOLS_FILE) -> list[str]:
    """Create or update every pool of ``work-pools.yaml`` and the tag limits; return the pool names."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectAlreadyExists

    spec = load_pools(pools_file)
    with get_client(sync_client=True) as client:
        for name, pool in spec["pools"].items():
            template = base_job_template(kind, pool.get(kind))
            try:
                client.create_work_pool(
                    WorkPoolCreate(
                        name=name,
                        type=kind,
                        base_job_template=template,
                        description=pool.get("description"),
                        concurrency_limit=pool["concurrency_limit"],
                    )
                )
            except ObjectAlreadyExists:
                client.update_work_pool(
                    name,
                    WorkPoolUpdate(
                        base_job_template=template,
                        description=pool.get("description"),
                        concurrency_limit=pool["concurrency_limit"],
                    ),
                )
        for tag, limit in (spec.get("tag_limits") or {}).items():
            client.create_concurrency_limit(tag=tag, concurrency_limit=limit)  # creates or updates
    return list(spec["pools"])


# ----------------------------------------------------------------------------------------------
# Deployments
# ----------------------------------------------------------------------------------------------
def apply_deployments(
    pool: str, preset: str | None = None, code_dir: str | None = None, prefect_file: Path = PREFECT_FILE
) -> None:
    """``prefect deploy --all`` on ``infra/prefect.yaml`` (run from the repository root, where the
    entrypoints are relative to), with the settings it reads from the environment."""
    env = {**os.environ, "TUNELINE_POOL": pool}
    if preset:
        env["TUNELINE_PRESET"] = str(Path(preset).resolve()) if Path(preset).exists() else preset
    if code_dir:
        env["TUNELINE_CODE_DIR"] = code_dir
    cmd = [_prefect(), "--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file)]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"prefect deploy failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")


def deploy(pool: str, kind: PoolKind = "process", preset: str | None = None, code_dir: str | None = None) -> None:
    """Pools, tag limits, then both deployments of ``infra/prefect.yaml`` targeting ``pool``."""
    pools = load_pools()["pools"]
    if pool not in pools:
        raise ValueError(f"unknown work pool {pool!r}; {POOLS_FILE} defines {', '.join(pools)}")
    apply_work_pools(kind)
    apply_deployments(pool, preset, code_dir)


# ----------------------------------------------------------------------------------------------
# serve-local: a Prefect server and workers on this box
# ----------------------------------------------------------------------------------------------
@dataclass
class WorkerSpec:
    """``POOL`` or ``POOL:GPUS`` (``gpu-v100:0``, ``gpu-a100x2:2,3``): a worker that sees only GPUS."""

    pool: str
    gpus: str | None = None

    @classmethod
    def parse(cls, text: str) -> "WorkerSpec":
        pool, _, gpus = text.partition(":")
        return cls(pool, gpus or None)

    def env(self) -> dict[str, str]:
        # The cpu pool sees no GPU at all (hardware.detect_machine reads "" as none); a GPU worker
        # sees only its cards, and the flow runs it starts inherit that.
        if self.gpus is None and self.pool == "cpu":
            return {"CUDA_VISIBLE_DEVICES": ""}
        return {"CUDA_VISIBLE_DEVICES": self.gpus} if self.gpus is not None else {}


@dataclass
class LocalStack:
    """``prefect server start`` and ``prefect worker start`` children, each in its own process
    group, stopped (group and all: flow runs, training children) by ``stop``."""

    host: str = "127.0.0.1"
    port: int = 4200
    log_dir: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def api_url(self) -> str:
        return f"http://{self.host}:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _start(self, name: str, cmd: list[str], extra_env: dict[str, str] | None = None) -> subprocess.Popen:
        env = {**os.environ, **self.env, "PREFECT_API_URL": self.api_url, **(extra_env or {})}
        out = open(self.log_dir / f"{name}.log", "ab") if self.log_dir else None
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT if out else None, start_new_session=True
        )
        self.procs.append(proc)
        return proc

    def start_server(self, timeout: float = 120) -> None:
        if self.log_dir:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        proc = self._start(
            "server", [_prefect(), "server", "start", "--host", self.host, "--port", str(self.port), "--analytics-off"]
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"prefect server exited with {proc.returncode}" + self._log_tail("server"))
            try:
                with urllib.request.urlopen(self.api_url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(
            f"prefect server not healthy on {self.api_url} after {timeout:.0f}s" + self._log_tail("server")
        )

    def start_worker(self, spec: WorkerSpec, limit: int | None = None) -> None:
        cmd = [
            _prefect(),
            "worker",
            "start",
            "--pool",
            spec.pool,
            "--type",
            "process",
            "--name",
            f"{spec.pool}-{spec.gpus or 'all'}@{os.uname().nodename}",
            "--install-policy",
            "never",
        ]
        if limit or spec.gpus is not None or spec.pool != "cpu":
            cmd += ["--limit", str(limit or 1)]  # one run at a time on a GPU set
        self._start(f"worker-{spec.pool}-{(spec.gpus or 'all').replace(',', '_')}", cmd, spec.env())

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()

    def _log_tail(self, name: str) -> str:
        if not self.log_dir or not (self.log_dir / f"{name}.log").exists():
            return ""
        return ":\n" + (self.log_dir / f"{name}.log").read_text(errors="replace")[-3000:]


def serve_local(
    port: int = 4200,
    pool: str = "cpu",
    workers: list[str] | None = None,
    preset: str | None = None,
    log_dir: Path | None = None,
) -> None:
    """Server, pools, deployments and workers on 127.0.0.1; runs until interrupted."""
    specs = [WorkerSpec.parse(w) for w in (workers if workers is not None else [pool])]
    stack = LocalStack(port=port, log_dir=log_dir)
    stop = lambda *_: (_ for _ in ()).throw(KeyboardInterrupt)  # noqa: E731 — SIGTERM ends like Ctrl-C
    signal.signal(signal.SIGTERM, stop)
    try:
        stack.start_server()
        os.environ["PREFECT_API_URL"] = stack.api_url
        deploy(pool, "process", preset)
        for spec in specs:
            stack.start_worker(spec)
        names = ", ".join(f"{s.pool}[GPUs {s.gpus}]" if s.gpus else s.pool for s in specs) or "none"
        print(
            f"tuneline: Prefect UI at {stack.ui_url} — deployments retrain/nightly and retrain/manual on pool "
            f"{pool!r}; workers: {names}. Ctrl-C stops.",
            flush=True,
        )
        while all(p.poll() is None for p in stack.procs):
            time.sleep(1)
        dead = [p.args[1:4] for p in stack.procs if p.poll() is not None]
        raise RuntimeError(f"a child exited: {dead}")
    except KeyboardInterrupt:
        pass
    finally:
        stack.stop()


def _prefect() -> str:
    """The ``prefect`` command of this interpreter's environment (PATH may point elsewhere)."""
    here = Path(sys.executable).with_name("prefect")
    return str(here) if here.exists() else (shutil.which("prefect") or "prefect")
