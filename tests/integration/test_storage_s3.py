"""Ray storage on an S3-compatible endpoint (training.storage) against a real S3-protocol
server (moto's, on loopback): the file system Ray gets reaches that endpoint, a tuning job's
state file round-trips through it, and a bad endpoint or a path that is not s3:// is refused
by name. The two-node training run on it is in tests/infra/."""

from __future__ import annotations

import uuid

import boto3
import pytest

from training.config import TrainConfig
from training.errors import ConfigError
from training.storage import ray_storage, storage_endpoint
from training.tune_runs import read_text, write_text


@pytest.fixture
def bucket(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path) -> str:
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "MEDIMG_S3_ENDPOINT", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    name = f"ray-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=moto_endpoint).create_bucket(Bucket=name)
    return name


def test_state_round_trips_through_the_endpoint(moto_endpoint: str, bucket: str) -> None:
    storage = ray_storage(f"s3://{bucket}/ray/", moto_endpoint)
    assert storage.path == f"{bucket}/ray" and storage.filesystem is not None
    assert storage.kwargs()["storage_filesystem"] is storage.filesystem
    uri = f"s3://{bucket}/ray/job/medimg_tune.json"
    write_text(uri, '{"ok": 1}', moto_endpoint)
    assert read_text(uri, moto_endpoint) == '{"ok": 1}'
    key = boto3.client("s3", endpoint_url=moto_endpoint).get_object(
        Bucket=bucket, Key="ray/job/medimg_tune.json"
    )
    assert key["Body"].read() == b'{"ok": 1}'


def test_the_endpoint_from_the_environment(
    moto_endpoint: str, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEDIMG_S3_ENDPOINT", moto_endpoint)
    assert storage_endpoint() == moto_endpoint
    uri = f"s3://{bucket}/env/state.json"
    write_text(uri, "x")
    assert read_text(uri) == "x"
    monkeypatch.delenv("MEDIMG_S3_ENDPOINT")
    assert ray_storage(f"s3://{bucket}/p").filesystem is None  # AWS: Ray resolves it


@pytest.mark.parametrize(
    ("path", "endpoint", "match"),
    [
        ("s3://b/p", "127.0.0.1:9000", r"expected http\(s\)://HOST\[:PORT\]"),
        ("s3://b/p", "http://host:9000/bucket", "no path"),
        ("/tmp/ray", "http://127.0.0.1:9000", "needs an s3:// --storage-path"),
    ],
)
def test_bad_endpoints_are_refused(path: str, endpoint: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ray_storage(path, endpoint)


def test_config_refuses_an_endpoint_without_s3(tmp_path) -> None:
    with pytest.raises(ConfigError, match="storage_endpoint"):
        TrainConfig(storage_path=str(tmp_path), storage_endpoint="http://127.0.0.1:9000")
