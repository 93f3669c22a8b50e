"""The artifact store: one root — a local folder or ``s3://bucket/prefix`` — holding every stage's output.

Layout under the root (docs/design.md, "Contracts between stages")::

    stages/<stage>/<fingerprint>/      written once when the stage completes, then immutable;
                                       ``_SUCCESS`` (the stage's ref as JSON) is written last
    locks/<stage>/<fingerprint>        held while a run builds that stage (``tasks/artifacts/locks.py``)
    scratch/<stage>/<fingerprint>/     work in progress (checkpoints) that a retry resumes from
    releases/<model>/<release_id>/     what leaves the pipeline; ``manifest.json`` last, then ``LATEST``

A stage's fingerprint (``tasks/core/fingerprints.py``) names the stage's folder and is the Prefect cache
key, so a rerun with nothing new is all cache hits on any machine that sees the same root. A cache
hit whose folder is gone (or has no ``_SUCCESS``) is not a hit: the stage runs again. Publishing
(``tasks/artifacts/stage_folders.py``) is atomic and never deletes what another run wrote.

S3 goes through boto3 (credentials from the environment, or from a prefect-aws ``AwsCredentials``
block, see ``blocks/``); an S3-compatible server is chosen with ``endpoint_url`` or the standard
``AWS_ENDPOINT_URL`` variable. Secrets are never part of a ``Store``'s repr or of any error it raises:
errors keep only the S3 error code and name the endpoint and bucket (a wrong key and a missing bucket
read differently). Uploads go through boto3's managed transfer (multipart above a threshold) and carry
the file's SHA-256 as object metadata (``x-amz-meta-sha256``), which ``head`` returns, so that a rerun
can skip what is already there; botocore retries transient errors with exponential backoff.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Callable

from pydantic import BaseModel, Field

SUCCESS = "_SUCCESS"


class StoreError(RuntimeError):
    """An artifact-store operation failed; the message names the location, never a secret.
    ``permanent`` marks failures that a retry cannot fix (missing bucket, rejected credentials)."""

    def __init__(self, message: str, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


# S3 error codes that retrying will not fix.
PERMANENT_S3_ERRORS = frozenset(
    {
        "NoSuchBucket",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "AccessDenied",
        "403",
        "NoCredentialsError",
        "InvalidBucketName",
    }
)


# ----------------------------------------------------------------------------------------------
# Refs and fingerprints
# ----------------------------------------------------------------------------------------------
class StageRef(BaseModel):
    """What a stage returns: where its output lives, its fingerprint and a few metrics."""

    stage: str
    fingerprint: str
    uri: str
    metrics: dict[str, Any] = Field(default_factory=dict)
    # SHA-256 over the sorted "<relative path> <file sha256>" lines of the folder (tasks/artifacts/stage_folders.py)
    digest: str = ""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# The store
# ----------------------------------------------------------------------------------------------
@dataclass
class Store:
    """A root URI plus the few operations the stages need. Keys are POSIX paths relative to the root."""

    root: str
    endpoint_url: str | None = None
    credentials: dict[str, str] | None = field(default=None, repr=False)
    # botocore's "standard" retry mode: transient errors (connection refused, 5xx, throttling) are
    # retried up to this many attempts in all, with exponential backoff (base 1 s, capped at 20 s).
    max_attempts: int = 5
    # Files above the threshold go up in parts of ``multipart_chunksize`` (S3: at least 5 MiB a part,
    # at most 10,000 parts): a failed part is retried alone, and parts upload in parallel.
    multipart_threshold: int = 64 << 20
    multipart_chunksize: int = 64 << 20

    def __post_init__(self) -> None:
        if self.root.lower().startswith("s3:"):
            bucket = self.root[5:].split("/", 1)[0] if self.root.startswith("s3://") else ""
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._\-]{0,62}", bucket):
                raise StoreError(
                    f"artifact root {self.root[:80]!r}: an S3 root needs a bucket, e.g. s3://bucket/prefix",
                    permanent=True,
                )
        self.root = self.root.rstrip("/")
        if not self.is_s3:
            try:
                self.root = str(Path(self.root).expanduser().resolve())
            except (OSError, RuntimeError, ValueError) as e:  # unreadable (/proc/1/root), a loop, a NUL byte
                why = getattr(e, "strerror", None) or type(e).__name__
                raise StoreError(f"artifact root {self.root[:200]!r}: {why}", permanent=True) from None
        self._client = None

    # -- addressing -------------------------------------------------------------------------
    @property
    def is_s3(self) -> bool:
        return self.root.startswith("s3://")

    @property
    def bucket(self) -> str:
        return self.root[5:].split("/", 1)[0]

    @property
    def prefix(self) -> str:
        rest = self.root[5:].split("/", 1)
        return rest[1] if len(rest) > 1 else ""

    def uri(self, key: str = "") -> str:
        key = safe_key(key) if key else ""
        return f"{self.root}/{key}" if key else self.root

    def _object_key(self, key: str) -> str:
        key = safe_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def local_path(self, key: str) -> Path:
        assert not self.is_s3
        return Path(self.root) / safe_key(key)

    @property
    def endpoint(self) -> str:
        """The S3 endpoint, without any user:password part a URL might carry."""
        from urllib.parse import urlsplit, urlunsplit

        url = self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or ""
        if not url:
            return "AWS default"
        parts = urlsplit(url)
        return (
            urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")))
            if parts.hostname
            else url
        )

    def where(self) -> str:
        """The location for error messages: endpoint and bucket, never credentials."""
        if not self.is_s3:
            return self.root
        return f"{self.root} (endpoint {self.endpoint}, bucket {self.bucket})"

    # -- S3 client --------------------------------------------------------------------------
    @property
    def client(self):
        if self._client is None:
            import boto3
            from botocore.config import Config

            creds = self.credentials or {}
            self._client = boto3.client(
                "s3",
                endpoint_url=self.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None,
                aws_access_key_id=creds.get("aws_access_key_id"),
                aws_secret_access_key=creds.get("aws_secret_access_key"),
                aws_session_token=creds.get("aws_session_token"),
                region_name=creds.get("region_name") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
                config=Config(
                    retries={"max_attempts": self.max_attempts, "mode": "standard"},
                    s3={"addressing_style": "path"},
                    connect_timeout=10,
                    read_timeout=60,
                ),
            )
        return self._client

    def _s3(self, what: str, fn: Callable[[], Any]) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn()
        except ClientError as e:  # keep only the error code: a response may echo request details
            raise self._error(what, e.response.get("Error", {}).get("Code", "?")) from None
        except BotoCoreError as e:
            raise self._error(what, type(e).__name__) from None
        except (OSError, ValueError) as e:  # boto3's transfer manager can surface these (e.g. a vanished local file)
            raise self._error(what, type(e).__name__) from None

    def _error(self, what: str, code: str) -> StoreError:
        return StoreError(self._explain(what, code), permanent=code in PERMANENT_S3_ERRORS)

    def _explain(self, what: str, code: str) -> str:
        """One readable line per failure: what failed, where, and the likely cause."""
        hint = {
            "NoSuchBucket": f"bucket {self.bucket!r} does not exist",
            "404": "not found (bucket or key)",
            "NoSuchKey": "no such key",
            "InvalidAccessKeyId": "credentials rejected: unknown access key",
            "SignatureDoesNotMatch": "credentials rejected: wrong secret key",
            "AccessDenied": "access denied: check the credentials and the bucket policy",
            "403": "access denied: check the credentials and the bucket policy",
            "EndpointConnectionError": "cannot reach the endpoint",
            "ConnectTimeoutError": "cannot reach the endpoint (timeout)",
            "NoCredentialsError": "no credentials: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or use a storage block",
        }.get(code)
        return f"S3 {what} failed at {self.where()}: {code}" + (f" ({hint})" if hint else "")

    def check(self, create: bool = True) -> None:
        """Fail fast, before any expensive work, when the bucket is missing or the credentials are
        wrong. A local root is created (``create``: a run) or must already be a folder (reading commands)."""
        if not self.is_s3:
            path = Path(self.root)
            try:
                if path.exists() and not path.is_dir():
                    raise StoreError(f"artifact root {self.root}: not a folder", permanent=True)
                if create:
                    path.mkdir(parents=True, exist_ok=True)
                elif not path.is_dir():
                    raise StoreError(f"artifact root {self.root}: no such folder", permanent=True)
            except OSError as e:
                raise StoreError(
                    f"artifact root {self.root}: {e.strerror or type(e).__name__}", permanent=True
                ) from None
            return
        from botocore.exceptions import ClientError

        try:
            self._s3("head bucket", lambda: self.client.head_bucket(Bucket=self.bucket))
        except StoreError as e:
            code = (
                getattr(e.__context__, "response", {}).get("Error", {}).get("Code")
                if isinstance(e.__context__, ClientError)
                else None
            )
            if code in ("404", "NoSuchBucket"):  # HEAD has no body, so a missing bucket is a bare 404
                raise self._error("head bucket", "NoSuchBucket") from None
            raise

    # -- operations -------------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        if not self.is_s3:
            return self.local_path(key).exists()
        return self.head(key) is not None

    def read_bytes(self, key: str) -> bytes:
        if not self.is_s3:
            return self.local_path(key).read_bytes()
        return self._s3(
            f"get {key}", lambda: self.client.get_object(Bucket=self.bucket, Key=self._object_key(key))["Body"].read()
        )

    def write_bytes(self, key: str, data: bytes) -> None:
        if not self.is_s3:
            path = self.local_path(key)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")  # two writers never share one
            tmp.write_bytes(data)
            os.replace(tmp, path)  # atomic: a reader sees the old file or the new one
            return
        self._s3(f"put {key}", lambda: self.client.put_object(Bucket=self.bucket, Key=self._object_key(key), Body=data))

    def read_json(self, key: str) -> Any:
        return json.loads(self.read_bytes(key))

    def write_json(self, key: str, value: Any) -> None:
        self.write_bytes(key, json.dumps(value, indent=2, ensure_ascii=False, default=str).encode())

    def list(self, prefix: str) -> list[str]:
        """Keys (relative to the root) of every file under ``prefix``."""
        prefix = safe_key(prefix)
        if not self.is_s3:
            base = self.local_path(prefix)
            if not base.is_dir():
                return []
            return sorted(
                str(PurePosixPath(prefix) / p.relative_to(base).as_posix()) for p in base.rglob("*") if p.is_file()
            )
        keys: list[str] = []
        strip = len(self.prefix) + 1 if self.prefix else 0
        paginator = self.client.get_paginator("list_objects_v2")

        def _collect():
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self._object_key(prefix) + "/"):
                keys.extend(obj["Key"][strip:] for obj in page.get("Contents", []))

        self._s3(f"list {prefix}", _collect)
        return sorted(keys)

    def upload_file(self, local: Path, key: str, sha256: str | None = None) -> None:
        """Upload one file; with ``sha256`` the digest is stored as object metadata (see ``head``)."""
        if not self.is_s3:
            dest = self.local_path(key)
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:12]}.tmp")
            shutil.copyfile(local, tmp)
            os.replace(tmp, dest)  # a reader never sees a half-copied file
            return
        from boto3.s3.transfer import TransferConfig

        # boto3's managed transfer does multipart above the threshold and retries parts.
        cfg = TransferConfig(multipart_threshold=self.multipart_threshold, multipart_chunksize=self.multipart_chunksize)
        extra = {"Metadata": {"sha256": sha256}} if sha256 else None
        self._s3(
            f"upload {key}",
            lambda: self.client.upload_file(
                str(local), self.bucket, self._object_key(key), Config=cfg, ExtraArgs=extra
            ),
        )

    def head(self, key: str) -> dict[str, Any] | None:
        """``{"size": bytes, "sha256": digest or None}`` of an object, or None when it is missing.
        On S3 the digest is the ``sha256`` metadata written by ``upload_file`` (what the uploader
        claims; ``sha256_of`` reads the content itself); locally it is computed."""
        if not self.is_s3:
            path = self.local_path(key)
            return {"size": path.stat().st_size, "sha256": sha256_file(path)} if path.is_file() else None
        from botocore.exceptions import ClientError

        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._object_key(key))
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code", "?")
            if code in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._error(f"head {key}", code) from None
        except Exception as e:  # noqa: BLE001 - connection errors and the like, without their text
            raise self._error(f"head {key}", type(e).__name__) from None
        return {"size": head["ContentLength"], "sha256": head.get("Metadata", {}).get("sha256")}

    def sha256_of(self, key: str, chunk: int = 1 << 20) -> str:
        """SHA-256 of an object's content as the store serves it, streamed (no local copy)."""
        if not self.is_s3:
            return sha256_file(self.local_path(key), chunk)

        def _hash() -> str:
            h = hashlib.sha256()
            for block in self.client.get_object(Bucket=self.bucket, Key=self._object_key(key))["Body"].iter_chunks(
                chunk
            ):
                h.update(block)
            return h.hexdigest()

        return self._s3(f"read {key}", _hash)

    def download_file(self, key: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        if not self.is_s3:
            shutil.copyfile(self.local_path(key), local)
            return
        self._s3(f"download {key}", lambda: self.client.download_file(self.bucket, self._object_key(key), str(local)))

    def delete(self, key: str) -> None:
        """Remove one object (no error when it is already gone)."""
        if not self.is_s3:
            self.local_path(key).unlink(missing_ok=True)
            return
        self._s3(f"delete {key}", lambda: self.client.delete_object(Bucket=self.bucket, Key=self._object_key(key)))

    def delete_prefix(self, prefix: str) -> None:
        if not self.is_s3:
            shutil.rmtree(self.local_path(prefix), ignore_errors=True)
            return
        for key in self.list(prefix):
            self._s3(
                f"delete {key}", lambda k=key: self.client.delete_object(Bucket=self.bucket, Key=self._object_key(k))
            )

    def upload_dir(self, local_dir: Path, prefix: str) -> None:
        for path in sorted(p for p in Path(local_dir).rglob("*") if p.is_file()):
            self.upload_file(path, f"{prefix}/{path.relative_to(local_dir).as_posix()}")

    def download_dir(self, prefix: str, local_dir: Path) -> None:
        strip = len(safe_key(prefix)) + 1
        for key in self.list(prefix):
            self.download_file(key, Path(local_dir) / key[strip:])

    # -- stage folders ----------------------------------------------------------------------
    def stage_key(self, stage: str, fp: str) -> str:
        return f"stages/{stage}/{fp}"

    def scratch_dir(self, stage: str, fp: str) -> Path:
        """A local folder for work in progress. For a local root it is ``<root>/scratch/...``, so a
        retry on the same box resumes from it; for S3 it is a local cache folder."""
        if self.is_s3:
            base = local_cache_dir() / "scratch" / hashlib.sha256(self.root.encode()).hexdigest()[:8]
        else:
            base = Path(self.root) / "scratch"
        path = base / stage / fp
        path.mkdir(parents=True, exist_ok=True)
        return path

    def completed(self, stage: str, fp: str) -> StageRef | None:
        """The ref of a completed stage folder, or None when it is missing or half-written."""
        key = f"{self.stage_key(stage, fp)}/{SUCCESS}"
        try:
            if not self.exists(key):
                return None
            return StageRef.model_validate(self.read_json(key))
        except (StoreError, ValueError):
            return None


def local_cache_dir() -> Path:
    return Path(os.environ.get("TUNELINE_CACHE", Path.home() / ".cache" / "tuneline"))


def safe_key(key: str) -> str:
    """Normalise a relative object key and refuse ``..`` and absolute paths.

    >>> safe_key("stages/sft/abc/")
    'stages/sft/abc'
    >>> safe_key("../etc/passwd")
    Traceback (most recent call last):
    ...
    ValueError: unsafe object key '../etc/passwd': no '..', no absolute path
    """
    parts = PurePosixPath(key.replace("\\", "/")).parts
    if key.startswith("/") or any(p in ("..",) for p in parts) or ":" in key.split("/")[0]:
        raise ValueError(f"unsafe object key {key!r}: no '..', no absolute path")
    return "/".join(p for p in parts if p not in ("", "."))


def store_for(root: str, storage_block: str | None = None) -> Store:
    """The store for an artifact root, with endpoint and credentials from a block when one is named."""
    if storage_block:
        from blocks.storage import load_store_settings

        settings = load_store_settings(storage_block)
        return Store(root, endpoint_url=settings.get("endpoint_url"), credentials=settings.get("credentials"))
    return Store(root)


def open_ref(ref: StageRef, storage_block: str | None = None) -> Path:
    """A local folder with the content of a stage's output (downloaded once for an S3 root)."""
    if not ref.uri.startswith("s3://"):
        return Path(ref.uri)
    local = local_cache_dir() / "stages" / ref.stage / ref.fingerprint
    if (local / SUCCESS).exists():
        return local
    root, key = ref.uri.split("/stages/", 1)
    store = store_for(root, storage_block)
    local_cache_dir().mkdir(parents=True, exist_ok=True)  # a fresh machine (or TUNELINE_CACHE) has none yet
    tmp = Path(tempfile.mkdtemp(dir=local_cache_dir(), prefix=".dl-"))
    store.download_dir(f"stages/{key}", tmp)
    local.parent.mkdir(parents=True, exist_ok=True)
    if local.exists() and not (local / SUCCESS).exists():  # an incomplete copy: move it aside, never delete in place
        aside = local.with_name(f".trash-{local.name}-{uuid.uuid4().hex[:12]}")
        with contextlib.suppress(FileNotFoundError):  # another process moved it first
            local.rename(aside)
        shutil.rmtree(aside, ignore_errors=True)
    try:
        tmp.rename(local)  # atomic
    except OSError:  # another process downloaded the same folder first and may be reading it: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
    return local
