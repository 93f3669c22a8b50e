"""A real MLflow tracking server for tests: ``mlflow server`` on 127.0.0.1 with a SQLite backend.

``MlflowServer`` starts it on a free port, waits until ``/health`` answers (artifacts proxied by the server
into a local folder, or into a bucket of the real S3 server when ``s3`` is given: ``--artifacts-destination
s3://…`` with ``MLFLOW_S3_ENDPOINT_URL``; with ``auth``, MLflow's ``basic-auth`` app, whose admin is that
user and password), and can be stopped and started again on the same port and database (for "the tracker was down
during the night" tests). It runs in its own process group, which ``stop()`` ends whole: ``mlflow server``
starts uvicorn and a job runner as children.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ADMIN = ("tuneline-admin", "pw-8d41b7a2e6f0-secret")  # the basic-auth app's admin (user, password)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class MlflowServer:
    data_dir: Path
    port: int = 0
    proc: subprocess.Popen | None = None
    s3: Any = None  # a tests.s3server.S3Server: the artifact store
    auth: tuple[str, str] | None = None  # (admin user, password) of the basic-auth app

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def db(self) -> Path:
        return self.data_dir / "mlflow.db"

    @property
    def artifacts(self) -> Path:
        return self.data_dir / "artifacts"

    @property
    def artifacts_prefix(self) -> str:
        """Where the artifacts lie in the S3 server's bucket (with ``s3``)."""
        return "mlflow-artifacts"

    def start(self, timeout: float = 120.0) -> "MlflowServer":
        self.port = self.port or _free_port()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        mlflow = Path(sys.executable).parent / "mlflow"
        cmd = [
            str(mlflow),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{self.db}",
            "--artifacts-destination",
            f"s3://{self.s3.bucket}/{self.artifacts_prefix}" if self.s3 else str(self.artifacts),
        ]
        log = open(self.data_dir / "server.log", "ab")
        # MLflow 3's job runner (a pool of huey consumers for GenAI jobs) is not needed here and costs the CPU
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        if self.s3:  # the server writes the artifacts it proxies with boto3, to the S3 server
            env.update(self.s3.env(), MLFLOW_S3_ENDPOINT_URL=self.s3.endpoint)
        if self.auth:
            cmd += ["--app-name", "basic-auth"]
            config = self.data_dir / "basic_auth.ini"
            config.write_text(
                "[mlflow]\ndefault_permission = READ\n"
                f"database_uri = sqlite:///{self.data_dir / 'basic_auth.db'}\n"
                f"admin_username = {self.auth[0]}\n"
                "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            )
            env.update(MLFLOW_AUTH_CONFIG_PATH=str(config), MLFLOW_AUTH_ADMIN_PASSWORD=self.auth[1])
            env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = "tuneline-test-csrf-key"  # the auth app's CSRF key
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.data_dir / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"mlflow server did not answer on {self.url} within {timeout}s")

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the group this server leads (start_new_session)
            self.proc.wait(timeout=20)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None
        # until nothing answers on the port: a "server down" test must really find it down
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) != 0:
                    return
            time.sleep(0.2)
