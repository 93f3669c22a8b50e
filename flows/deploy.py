"""Operate tuneline as a service: work pools, deployments, and a server + worker on one box.

    tuneline deploy --pool gpu-v100                        # pools, GPU tag limit, infra/prefect.yaml
    tuneline deploy --pool cpu --preset demo               # the offline demo as the nightly, CPU
    tuneline deploy --pool gpu-v100 --kind kubernetes      # cluster: pools from the Kubernetes template
    tuneline serve-local                                   # server + cpu worker on http://127.0.0.1:4200
    tuneline serve-local --pool gpu-v100 --worker gpu-v100:0 --worker gpu-v100:1   # one worker per GPU

Prefect does the work; this module only strings its pieces together in the order an operator
would type them (docs/operating.md):

1. work pools, one per hardware profile (``infra/work-pools.yaml``, validated on load), from the
   base job template of the chosen kind (``infra/work-pools/process.json`` or ``kubernetes.json``)
   with ``TUNELINE_POOL_PROFILE`` (the pool's profile) in its ``env``; a GPU pool's concurrency
   limit is its ``gpu_sets``, and the ``gpu`` tag limit (held by GPU-using task runs) their sum;
2. ``prefect deploy --all --prefect-file infra/prefect.yaml``, whose build step is
   ``deployment_values`` below (reads and validates the parameter preset);
3. for ``serve-local``: ``prefect server start`` on 127.0.0.1 and ``prefect worker start`` per
   ``--worker`` (a GPU worker sees only its cards through ``CUDA_VISIBLE_DEVICES``); a GPU pool's
   ``gpu_sets`` becomes the number of workers started for it.
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
from dataclasses import dataclass, field, replace
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
def deployment_values(
    preset: str | None = None, code_dir: str | None = None, schedule: str | None = None
) -> dict[str, Any]:
    """``prefect deploy`` build step: the deployments' parameters and where the code lives.

    ``preset`` is a YAML file or a name in ``flows/presets`` (default ``infra/presets/nightly.yaml``);
    it is validated as ``RetrainParams`` here, so a typo fails the deploy, not the 01:30 run. The
    parameters are stored in full (every field), so the UI's Run form opens prefilled with them, and
    again as ``preset``, which the flow merges a partial ``params`` over (flows/effective.py).
    ``schedule`` ``off`` pauses the nightly's schedule."""
    from flows.params import load_params
    from flows.watch import trigger_values

    params = load_params(preset or NIGHTLY_PRESET)
    code = Path(code_dir or REPO)
    # The release-ops deployment (UI buttons for promote, rollback, prune) acts on the preset's store and model.
    ops = {
        "model_name": params.release.model_name,
        "artifact_root": params.artifact_root,
        "storage_block": params.storage_block,
        "keep_last": params.release.keep_last,
        "stage_max_age_days": params.release.stage_max_age_days,
    }
    return {
        "params": params.model_dump(mode="json"),
        "code_dir": str(code),
        "release_ops": ops,
        "schedule_active": (schedule or "").strip().lower() != "off",
        "trigger": trigger_values(params.data.trigger),  # the watch-data deployment and the nightly's trigger
    }


# ----------------------------------------------------------------------------------------------
# infra/work-pools.yaml: the pools, their profiles and limits, and the GPU tag limit
# ----------------------------------------------------------------------------------------------
KINDS: tuple[str, ...] = ("process", "kubernetes")
GPU_TAG = "gpu"
POOL_FIELDS = ("profile", "description", "gpu_sets", "concurrency_limit", *KINDS)


class PoolsFileError(ValueError):
    """``work-pools.yaml`` is wrong; the message is one line naming the file, the pool and the field."""


@dataclass(frozen=True)
class PoolSpec:
    """One pool of ``work-pools.yaml``. ``gpu_sets`` is how many GPU sets its workers serve (0 for a
    CPU pool), and for a GPU pool also its concurrency limit: one flow run per GPU set."""

    name: str
    profile: str
    gpus: int  # GPUs one run needs: the profile's requirement
    concurrency_limit: int
    gpu_sets: int = 0
    description: str | None = None
    variables: dict[str, dict[str, Any]] = field(default_factory=dict)  # per kind: template variable defaults


@dataclass(frozen=True)
class PoolsSpec:
    path: Path
    pools: dict[str, PoolSpec]

    @property
    def gpu_tag_limit(self) -> int:
        """The GPU sets of all GPU pools together. Never 0: Prefect aborts a task whose tag limit is 0,
        and the CPU demo's SFT is tagged ``gpu`` too."""
        return max(1, sum(p.gpu_sets for p in self.pools.values() if p.gpus))

    def with_gpu_sets(self, gpu_sets: dict[str, int]) -> PoolsSpec:
        """The same pools with these GPU pools serving this many GPU sets (``serve-local``'s workers)."""
        pools = dict(self.pools)
        for name, sets in gpu_sets.items():
            if name not in pools or not pools[name].gpus:
                raise PoolsFileError(f"{self.path}: pool {name!r}: not a GPU pool of this file, has no gpu_sets")
            pools[name] = replace(pools[name], gpu_sets=sets, concurrency_limit=sets)
        return PoolsSpec(self.path, pools)


def load_pools(path: Path | None = None) -> PoolsSpec:
    """Read and validate ``work-pools.yaml``; a mistake raises ``PoolsFileError`` naming file, pool and field."""
    from tasks.runtime.hardware import PROFILES

    path = path or POOLS_FILE

    def fail(where: str, problem: str) -> PoolsFileError:
        return PoolsFileError(f"{path}: {where}: {problem}")

    def count(where: str, value: Any, least: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise fail(where, f"expected an integer ≥ {least}, got {value!r}")
        return value

    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise fail("YAML", " ".join(str(e).split())) from None
    if not isinstance(data, dict) or not isinstance(data.get("pools"), dict) or not data["pools"]:
        raise fail("top level", "expected a mapping with a non-empty mapping 'pools'")
    for key in set(data) - {"pools"}:
        why = "the gpu tag limit is derived now (the sum of the GPU pools' gpu_sets)" if key == "tag_limits" else ""
        raise fail("top level", f"unknown key {key!r}" + (f": {why}" if why else " (known: pools)"))

    known = ", ".join(PROFILES)
    pools = {}
    for name, body in data["pools"].items():
        where = f"pool {name!r}"
        if not isinstance(body, dict):
            raise fail(where, f"expected a mapping of fields, got {body!r}")
        for key in body:
            if key not in POOL_FIELDS:
                raise fail(f"{where}, field {key!r}", f"unknown field (known: {', '.join(POOL_FIELDS)})")
        if "profile" not in body:
            raise fail(f"{where}, field 'profile'", f"missing (one of {known})")
        profile = body["profile"]
        if not isinstance(profile, str) or profile not in PROFILES:
            raise fail(f"{where}, field 'profile'", f"unknown profile {profile!r} (known: {known})")
        description = body.get("description")
        if description is not None and not isinstance(description, str):
            raise fail(f"{where}, field 'description'", f"expected a string, got {description!r}")
        gpus = PROFILES[profile].requirement.gpus
        # A GPU pool's limit is derived from what its workers serve; a CPU pool has no GPU sets.
        own, other = ("gpu_sets", "concurrency_limit") if gpus else ("concurrency_limit", "gpu_sets")
        if other in body:
            why = "a GPU pool's limit is its gpu_sets" if gpus else "a cpu pool serves no GPU sets"
            raise fail(f"{where}, field {other!r}", f"not for profile {profile} ({why}); set {own}")
        if own not in body:
            raise fail(f"{where}, field {own!r}", "missing" + (": how many GPU sets its workers serve" if gpus else ""))
        limit = count(f"{where}, field {own!r}", body[own], 0 if gpus else 1)
        variables = {}
        for kind in KINDS:
            values = body.get(kind) or {}
            if not isinstance(values, dict):
                raise fail(f"{where}, field {kind!r}", f"expected a mapping of template variables, got {values!r}")
            props = _template(kind)["variables"]["properties"]
            for key in values:
                if key not in props:
                    raise fail(f"{where}, field '{kind}.{key}'", f"the {kind} template has no such variable")
            if not isinstance(values.get("env", {}), dict):
                raise fail(f"{where}, field '{kind}.env'", f"expected a mapping, got {values['env']!r}")
            variables[kind] = values
        pools[name] = PoolSpec(name, profile, gpus, limit, limit if gpus else 0, description, variables)
    return PoolsSpec(path, pools)


def _template(kind: str) -> dict[str, Any]:
    return json.loads((INFRA / "work-pools" / f"{kind}.json").read_text())


def base_job_template(kind: PoolKind, pool: PoolSpec) -> dict[str, Any]:
    """The kind's base job template with the pool's variable defaults (e.g. ``gpus``, ``node_selector``),
    and ``TUNELINE_POOL_PROFILE`` in its ``env``: ``sft.profile: auto`` resolves to the pool's profile."""
    from tasks.runtime.hardware import POOL_PROFILE_ENV

    template = _template(kind)
    props = template["variables"]["properties"]
    overrides = dict(pool.variables.get(kind, {}))
    # The pool's env adds to the template's (it does not replace it); the profile comes last.
    env = {**props["env"]["default"], **overrides.pop("env", {}), POOL_PROFILE_ENV: pool.profile}
    for key, value in overrides.items():
        props[key]["default"] = value
    props["env"]["default"] = env
    return template


def apply_work_pools(
    kind: PoolKind = "process", pools_file: Path | None = None, gpu_sets: dict[str, int] | None = None
) -> PoolsSpec:
    """Create or update every pool of ``work-pools.yaml`` (``gpu_sets`` overrides what GPU pools serve)
    and the ``gpu`` tag limit; return the pools as applied."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectAlreadyExists

    spec = load_pools(pools_file).with_gpu_sets(gpu_sets or {})
    with get_client(sync_client=True) as client:
        for pool in spec.pools.values():
            fields = dict(
                base_job_template=base_job_template(kind, pool),
                description=pool.description,
                concurrency_limit=pool.concurrency_limit,
            )
            try:
                client.create_work_pool(WorkPoolCreate(name=pool.name, type=kind, **fields))
            except ObjectAlreadyExists:
                client.update_work_pool(pool.name, WorkPoolUpdate(**fields))
        client.create_concurrency_limit(tag=GPU_TAG, concurrency_limit=spec.gpu_tag_limit)  # creates or updates
    return spec


# ----------------------------------------------------------------------------------------------
# Deployments
# ----------------------------------------------------------------------------------------------
def apply_deployments(
    pool: str,
    preset: str | None = None,
    code_dir: str | None = None,
    prefect_file: Path = PREFECT_FILE,
    schedule: bool = True,
    api_url: str | None = None,
) -> None:
    """``prefect deploy --all`` on ``infra/prefect.yaml`` (run from the repository root, where the
    entrypoints are relative to), with the settings it reads from the environment."""
    env = {**os.environ, "TUNELINE_POOL": pool, "TUNELINE_SCHEDULE": "on" if schedule else "off"}
    if api_url:
        env["PREFECT_API_URL"] = api_url
    if preset:
        env["TUNELINE_PRESET"] = str(Path(preset).resolve()) if Path(preset).exists() else preset
    if code_dir:
        env["TUNELINE_CODE_DIR"] = code_dir
    cmd = [_prefect(), "--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file)]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"prefect deploy failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")


def deploy(
    pool: str,
    kind: PoolKind = "process",
    preset: str | None = None,
    code_dir: str | None = None,
    gpu_sets: dict[str, int] | None = None,
    schedule: bool = True,
    api_url: str | None = None,
) -> PoolsSpec:
    """Pools, the gpu tag limit, then the deployments of ``infra/prefect.yaml`` targeting ``pool``, on
    the server at ``api_url`` (default: Prefect's settings). The pools file is validated before the
    server is touched; ``schedule=False`` pauses the nightly's schedule."""
    pools = load_pools().pools
    if pool not in pools:
        raise ValueError(f"unknown work pool {pool!r}; {POOLS_FILE} defines {', '.join(pools)}")
    target = pools[pool]
    if target.gpus and not (gpu_sets or {}).get(pool, target.gpu_sets):
        raise ValueError(
            f"work pool {pool!r} serves 0 GPU sets ({POOLS_FILE}: gpu_sets), so its runs would never start; "
            f"set gpu_sets to the number of {target.profile} GPU sets its workers serve"
        )
    from prefect.settings import PREFECT_API_URL, temporary_settings

    # Explicitly: Prefect's settings were read when it was imported, so setting PREFECT_API_URL in the
    # environment now would leave the client on an in-process server of its own (issue 26).
    with temporary_settings(updates={PREFECT_API_URL: api_url} if api_url else {}):
        spec = apply_work_pools(kind, gpu_sets=gpu_sets)
    apply_deployments(pool, preset, code_dir, schedule=schedule, api_url=api_url)
    return spec


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

    @property
    def devices(self) -> list[str]:
        return [d.strip() for d in (self.gpus or "").split(",") if d.strip()]

    def env(self) -> dict[str, str]:
        # The cpu pool sees no GPU at all (hardware.detect_machine reads "" as none); a GPU worker
        # sees only its cards, and the flow runs it starts inherit that.
        if self.gpus is None and self.pool == "cpu":
            return {"CUDA_VISIBLE_DEVICES": ""}
        return {"CUDA_VISIBLE_DEVICES": self.gpus} if self.gpus is not None else {}


def served_gpu_sets(specs: list[WorkerSpec], pools: PoolsSpec) -> dict[str, int]:
    """GPU sets per GPU pool that has workers here: one per worker (``--limit 1``). Refuses a worker
    of an unknown pool, fewer cards than its profile needs, and a card given to two workers (or to
    all of them: a GPU worker without cards beside another)."""
    sets: dict[str, int] = {}
    owner: dict[str, str] = {}
    gpu_workers = [s for s in specs if s.pool in pools.pools and pools.pools[s.pool].gpus]
    for spec in specs:
        if spec.pool not in pools.pools:
            raise ValueError(f"worker {spec.pool}: unknown work pool; {pools.path} defines {', '.join(pools.pools)}")
        pool = pools.pools[spec.pool]
        if not pool.gpus:
            continue
        if spec.gpus is None and len(gpu_workers) > 1:  # it would see, and share, every card
            raise ValueError(f"worker {spec.pool}: with several GPU workers, give each its cards ({spec.pool}:0)")
        sets[spec.pool] = sets.get(spec.pool, 0) + 1
        if spec.gpus is not None and len(spec.devices) < pool.gpus:
            raise ValueError(f"worker {spec.pool}:{spec.gpus}: profile {pool.profile} needs {pool.gpus} GPUs per run")
        for device in spec.devices:
            if device in owner:
                raise ValueError(f"GPU {device} is given to two workers ({owner[device]}, {spec.pool}:{spec.gpus})")
            owner[device] = f"{spec.pool}:{spec.gpus}"
    return sets


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
        from tasks.runtime.guard import die_with_parent  # SIGTERM when serve-local dies, even by SIGKILL

        env = {**os.environ, **self.env, "PREFECT_API_URL": self.api_url, **(extra_env or {})}
        out = open(self.log_dir / f"{name}.log", "ab") if self.log_dir else None
        err = subprocess.STDOUT if out else None
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=out, stderr=err, start_new_session=True, preexec_fn=die_with_parent
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
    """Server, pools, deployments and workers on 127.0.0.1; runs until interrupted.

    Demo-ready on a CPU box: with no preset, a pool without GPUs gets the demo parameters
    (``flows/presets/demo.yaml``), and on a machine without a GPU the nightly's schedule is left off."""
    from tasks.runtime.hardware import detect_machine

    pools = load_pools()
    specs = [WorkerSpec.parse(w) for w in (workers if workers is not None else [pool])]
    gpu_sets = served_gpu_sets(specs, pools)  # before anything starts: a wrong --worker fails here
    if pool not in pools.pools:
        raise ValueError(f"unknown work pool {pool!r}; {pools.path} defines {', '.join(pools.pools)}")
    if preset is None and not pools.pools[pool].gpus:
        preset = "demo"
        print(f"tuneline: no --preset: the deployments get the demo parameters (pool {pool!r} has no GPU)", flush=True)
    machine = detect_machine()
    schedule = bool(machine.gpus)
    if not schedule:
        print(
            f"tuneline: nightly schedule left off: {machine.describe()} (turn it on in the UI, Deployments → "
            "retrain/nightly, or serve-local on a GPU box)",
            flush=True,
        )
    stack = LocalStack(port=port, log_dir=log_dir)
    stop = lambda *_: (_ for _ in ()).throw(KeyboardInterrupt)  # noqa: E731 — SIGTERM ends like Ctrl-C
    signal.signal(signal.SIGTERM, stop)
    try:
        stack.start_server()
        os.environ["PREFECT_API_URL"] = stack.api_url  # for children; this process's client gets it explicitly
        applied = deploy(pool, "process", preset, gpu_sets=gpu_sets, schedule=schedule, api_url=stack.api_url)
        for spec in specs:
            stack.start_worker(spec)
        names = ", ".join(f"{s.pool}[GPUs {s.gpus}]" if s.gpus else s.pool for s in specs) or "none"
        print(
            f"tuneline: Prefect UI at {stack.ui_url} — deployments retrain/nightly, retrain/manual, release-ops, "
            f"watch-data/watch-data, compare/compare; pool "
            f"{pool!r}; workers: {names}; GPU sets: "
            + (", ".join(f"{p.name} {p.gpu_sets}" for p in applied.pools.values() if p.gpus) or "none")
            + f", gpu tag limit {applied.gpu_tag_limit}. Ctrl-C stops.",
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
