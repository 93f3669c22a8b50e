"""A real tuneline service for tests: ``tuneline serve-local`` (Prefect server on 127.0.0.1 with
SQLite in a temporary PREFECT_HOME, work pools, the deployments of infra/prefect.yaml, workers),
started as a user would start it and stopped with its whole process group."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_preset(path: Path, model_dir: Path, artifact_root: Path) -> Path:
    """The demo preset cut to the minimum: tiny random model, 24 rows, 2 SFT steps, validation only."""
    preset = yaml.safe_load((REPO / "flows" / "presets" / "demo.yaml").read_text())
    preset["model"] = {"base": str(model_dir), "revision": "local"}
    preset["data"].update(datasets=["swift/self-cognition#16", "tuneline/arithmetic#8"], validation_max_rows=4)
    preset["sft"].update(max_steps=2, eval_steps=2, save_steps=2, logging_steps=1, max_length=128)
    # 24 rows give a handful of validation rows, too few for a paired test ever to fail: the gate
    # would say "inconclusive"; these runs are about serving and the UI, so a person allows it.
    preset["eval"].update(suites=["validation"], validation_max_rows=5, allow_inconclusive=True)
    preset["artifact_root"] = str(artifact_root)
    path.write_text(yaml.safe_dump(preset, sort_keys=False))
    return path


class ServeLocal:
    def __init__(self, home: Path, preset: Path | None, workers: list[str], pool: str = "cpu"):
        self.home, self.port = home, free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.ui_url = f"http://127.0.0.1:{self.port}"
        self.log_dir = home / "logs"
        self.env = {
            **os.environ,
            "PREFECT_HOME": str(home / "prefect"),
            "PREFECT_API_URL": self.api_url,
            "PREFECT_WORKER_QUERY_SECONDS": "2",  # pick runs up quickly
            "PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS": "3",  # re-try a queued run soon
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        }
        cmd = [
            sys.executable,
            "-m",
            "flows.cli",
            "serve-local",
            "--port",
            str(self.port),
            "--pool",
            pool,
            *(["--preset", str(preset)] if preset else []),
            "--log-dir",
            str(self.log_dir),
        ]
        cmd += ["--no-worker"] if not workers else [a for w in workers for a in ("--worker", w)]
        self.out = open(home / "serve-local.out", "wb")
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, env=self.env, stdout=self.out, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.workers = workers

    def wait_ready(self, timeout: float = 240) -> None:
        """The deployments applied (retrain/manual readable) and every worker online."""
        from prefect.client.orchestration import SyncPrefectClient
        from prefect.client.schemas.filters import WorkerFilter, WorkerFilterStatus

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve-local exited with {self.proc.returncode}:\n{self.output()}")
            try:
                with SyncPrefectClient(self.api_url) as client:
                    client.read_deployment_by_name("retrain/manual")
                    online = 0
                    for pool in {w.split(":")[0] for w in self.workers}:
                        online += len(
                            client.read_workers_for_work_pool(
                                pool, worker_filter=WorkerFilter(status=WorkerFilterStatus(any_=["ONLINE"]))
                            )
                        )
                    if online >= len(self.workers):
                        return
            except Exception:  # noqa: BLE001 — not up yet
                pass
            time.sleep(1)
        raise TimeoutError(f"serve-local not ready after {timeout:.0f}s:\n{self.output()}")

    def output(self) -> str:
        text = (self.home / "serve-local.out").read_text(errors="replace")[-3000:]
        for log in sorted(self.log_dir.glob("*.log")) if self.log_dir.exists() else []:
            text += f"\n--- {log.name}\n" + log.read_text(errors="replace")[-3000:]
        return text

    def stop(self) -> None:
        """SIGTERM: serve-local stops its server and workers (their groups); then its own group."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.out.close()
