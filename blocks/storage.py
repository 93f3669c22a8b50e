"""The artifact-store block: root, S3 endpoint and credentials, edited in the Prefect UI.

Register and save one (a person does this once per workspace)::

    prefect block register -m blocks.storage
    python -c "from blocks.storage import ArtifactStore; from prefect_aws import AwsCredentials; \
        ArtifactStore(root='s3://models/tuneline', endpoint_url='http://127.0.0.1:8333', \
        credentials=AwsCredentials(aws_access_key_id='...', aws_secret_access_key='...')).save('nightly')"

then run with ``storage_block: nightly``. Credentials are ``SecretStr`` fields of prefect-aws's
``AwsCredentials``: the UI masks them and they never reach logs, artifacts or manifests.
"""

from __future__ import annotations

from typing import Any

from prefect.blocks.core import Block
from prefect_aws import AwsCredentials
from pydantic import Field


class ArtifactStore(Block):
    """Where tuneline keeps stage outputs and releases."""

    _block_type_name = "Tuneline Artifact Store"
    _description = "Artifact root (local folder or s3://bucket/prefix), S3 endpoint and credentials for tuneline."

    root: str = Field(default="./artifacts", description="A local folder or s3://bucket/prefix.")
    endpoint_url: str | None = Field(
        default=None, description="S3-compatible endpoint (MinIO, SeaweedFS...); empty for AWS."
    )
    credentials: AwsCredentials | None = Field(
        default=None, description="prefect-aws credentials; empty: the environment's."
    )


def load_store_settings(name: str) -> dict[str, Any]:
    """Root, endpoint and boto3 credential arguments from a saved ``ArtifactStore`` block.

    The endpoint is the block's ``endpoint_url``, else the one in the credentials' client parameters
    (prefect-aws ``AwsClientParameters.endpoint_url``), else none (AWS or ``AWS_ENDPOINT_URL``).
    The result holds the secret key in clear for boto3: pass it to ``Store`` (which keeps it out of
    its repr and errors), never to a log or an artifact."""
    block = ArtifactStore.load(name)
    creds = None
    endpoint = block.endpoint_url
    if block.credentials is not None:
        c = block.credentials
        creds = {
            "aws_access_key_id": c.aws_access_key_id,
            "aws_secret_access_key": c.aws_secret_access_key.get_secret_value() if c.aws_secret_access_key else None,
            "aws_session_token": c.aws_session_token.get_secret_value() if c.aws_session_token else None,
            "region_name": c.region_name,
        }
        endpoint = endpoint or c.aws_client_parameters.endpoint_url
    return {"root": block.root, "endpoint_url": endpoint, "credentials": creds}
