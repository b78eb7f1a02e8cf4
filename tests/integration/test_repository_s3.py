"""serving.repository.s3 against a real S3-protocol server: moto's server mode on loopback, run as a
child process whose PID the fixture holds and stops::

    python -m pytest -q tests/integration/test_repository_s3.py -p no:cacheprovider
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

import pytest

from serving.repository.s3 import (
    download_repository,
    next_remote_version,
    parse_s3_url,
    remote_versions,
    s3_client,
    upload_model_set,
)
from serving.server.network import find_free_port
from training.errors import ConfigError, ServingError

PRE, ONNX, ENS = "tiny_preprocess", "tiny_onnx", "tiny"
MODELS = [PRE, ONNX, ENS]  # composing models first, the ensemble last
PREFIX = "triton/repo"


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Fixed test credentials; no shared config, profile or endpoint from the host."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("MEDIMG_S3_ENDPOINT", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))


@pytest.fixture
def client(moto_endpoint: str):
    return s3_client(moto_endpoint, connect_timeout=2, read_timeout=30, max_attempts=1)


@pytest.fixture
def bucket_url(client) -> str:
    bucket = f"medimg-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=bucket)
    return f"s3://{bucket}/{PREFIX}/"


class Recorder:
    """Forwards to the real client; records the keys it is asked to write, in order."""

    def __init__(self, client) -> None:
        self._client = client
        self.keys: list[str] = []

    def put_object(self, **kwargs):
        self.keys.append(kwargs["Key"])
        return self._client.put_object(**kwargs)

    def upload_file(self, filename, bucket, key, *args, **kwargs):
        self.keys.append(key)
        return self._client.upload_file(filename, bucket, key, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._client, name)


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


@pytest.fixture
def local_repo(tmp_path: Path) -> Path:
    """Three models by hand: versions 1 and 2 of the composing models, the ensemble's empty 1/."""
    repo = tmp_path / "repo"
    rand = os.urandom
    for model in MODELS:
        _write(repo / model / "config.pbtxt", f'name: "{model}"\n'.encode())
    _write(repo / PRE / "warmup" / "sample_image.bin", rand(300))
    _write(repo / ONNX / "labels.txt", b"normal\npneumonia\n")
    _write(repo / ENS / "labels.txt", b"normal\npneumonia\n")
    (repo / ENS / "1").mkdir()
    for version in (1, 2):
        _write(repo / PRE / str(version) / "model.py", f"# preprocess v{version}\n".encode())
        _write(repo / ONNX / str(version) / "model.py", f"# onnx v{version}\n".encode())
        _write(repo / ONNX / str(version) / "model.onnx", rand(2048))
    # version 2's ONNX file above the 8 MiB multipart threshold of upload_file
    _write(repo / ONNX / "2" / "model.onnx", rand(9 * 1024 * 1024 + 17))
    _write(repo / ONNX / ".3.new-abc" / "model.onnx", b"a staging directory: never uploaded")
    return repo


def _tree(root: Path, skip_versions: tuple[str, ...] = ()) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
        and not any(s.startswith(".") for s in p.relative_to(root).parts)
        and p.relative_to(root).parts[1] not in skip_versions
    }


def _objects(client, url: str) -> dict[str, tuple[str, int, object, bytes]]:
    bucket, prefix = parse_s3_url(url)
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            body = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            found[obj["Key"]] = (obj["ETag"], obj["Size"], obj["LastModified"], body)
    return found


def test_round_trip_every_byte(client, bucket_url: str, local_repo: Path, tmp_path: Path) -> None:
    keys = upload_model_set(local_repo, MODELS, 1, bucket_url, client)
    assert f"{PREFIX}/{ENS}/1/" in keys  # the ensemble's empty version directory, as a marker
    assert not any(".3.new" in k or "/2/" in k for k in keys)
    objects = _objects(client, bucket_url)
    assert objects[f"{PREFIX}/{ENS}/1/"][1] == 0
    assert sorted(objects) == sorted(keys)

    first = tmp_path / "first"
    download_repository(bucket_url, first, client)
    assert _tree(first) == _tree(local_repo, skip_versions=("2",))
    assert (first / ENS / "1").is_dir() and not any((first / ENS / "1").iterdir())

    # version 2: the ensemble has no 2/ (its version is its config): config and labels only
    keys2 = upload_model_set(local_repo, MODELS, 2, bucket_url, client)
    assert not any(k.startswith(f"{PREFIX}/{ENS}/1") for k in keys2)
    assert f"{PREFIX}/{ENS}/config.pbtxt" in keys2
    second = tmp_path / "second"
    written = download_repository(bucket_url, second, client)
    assert _tree(second) == _tree(local_repo)  # includes the 9 MiB multipart upload
    assert len(written) == len(_tree(local_repo))
    assert remote_versions(client, bucket_url, ONNX) == [1, 2]
    assert remote_versions(client, bucket_url, ENS) == [1]


def test_config_uploaded_last(client, bucket_url: str, local_repo: Path) -> None:
    recorder = Recorder(client)
    keys = upload_model_set(local_repo, MODELS, 1, bucket_url, recorder)
    assert recorder.keys == keys
    configs = [f"{PREFIX}/{m}/config.pbtxt" for m in MODELS]
    assert keys[-len(MODELS) :] == configs  # every config.pbtxt last, ensemble's at the end
    versioned = [i for i, k in enumerate(keys) if k.split("/")[3].isdigit()]
    model_level = [i for i, k in enumerate(keys) if k.endswith(("labels.txt", ".bin"))]
    assert len(versioned) == 4 and len(model_level) == 3  # 1+2 files, 1 marker; labels, warmup
    assert max(versioned) < min(model_level) and max(model_level) < len(keys) - len(MODELS)


def test_existing_version_is_refused_and_untouched(
    client, bucket_url: str, local_repo: Path
) -> None:
    upload_model_set(local_repo, MODELS, 1, bucket_url, client)
    before = _objects(client, bucket_url)
    (local_repo / PRE / "1" / "model.py").write_bytes(b"# changed: must not reach the bucket\n")
    (local_repo / ONNX / "labels.txt").write_bytes(b"changed\n")
    recorder = Recorder(client)
    with pytest.raises(ConfigError, match=rf"{PREFIX}/{PRE}/1/.*already exists.*{PRE}/1/model\.py"):
        upload_model_set(local_repo, MODELS, 1, bucket_url, recorder)
    assert recorder.keys == []
    assert _objects(client, bucket_url) == before

    # only one model's version 2 exists remotely: still nothing is written
    bucket, _ = parse_s3_url(bucket_url)
    client.put_object(Bucket=bucket, Key=f"{PREFIX}/{ONNX}/2/model.onnx", Body=b"someone else's")
    before = _objects(client, bucket_url)
    with pytest.raises(ConfigError, match=rf"{ONNX}/2/ already exists"):
        upload_model_set(local_repo, MODELS, 2, bucket_url, recorder)
    assert recorder.keys == []
    assert _objects(client, bucket_url) == before
    assert remote_versions(client, bucket_url, PRE) == [1]


def test_next_remote_version(client, bucket_url: str, local_repo: Path) -> None:
    assert remote_versions(client, bucket_url, ONNX) == []
    assert next_remote_version(client, bucket_url, MODELS) == 1
    upload_model_set(local_repo, MODELS, 1, bucket_url, client)
    assert next_remote_version(client, bucket_url, ONNX) == 2
    assert next_remote_version(client, bucket_url, MODELS) == 2
    bucket, _ = parse_s3_url(bucket_url)
    for key in ("07/model.onnx", "tmp/model.onnx", "10/model.onnx"):  # Triton ignores 07, tmp
        client.put_object(Bucket=bucket, Key=f"{PREFIX}/{ONNX}/{key}", Body=b"x")
    assert remote_versions(client, bucket_url, ONNX) == [1, 10]
    assert next_remote_version(client, bucket_url, [PRE, ONNX]) == 11
    assert next_remote_version(client, bucket_url, PRE) == 2


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("s3://bucket", ("bucket", "")),
        ("s3://my.bucket-1/", ("my.bucket-1", "")),
        ("s3://bucket//a///b/", ("bucket", "a/b")),
    ],
)
def test_parse_s3_url(url: str, expected: tuple[str, str]) -> None:
    assert parse_s3_url(url) == expected


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://bucket/prefix", "not an S3 URL"),
        ("bucket/prefix", "not an S3 URL"),
        ("s3:/bucket", "not an S3 URL"),
        ("s3://", "has no bucket"),
        ("s3:///prefix", "has no bucket"),
        ("s3://Bad_Bucket/x", "not a valid bucket name"),
        ("s3://ab/x", "not a valid bucket name"),
        ("s3://127.0.0.1:9000/bucket/x", "names an endpoint"),
        ("s3://http://minio:9000/bucket", "names an endpoint"),
        ("s3://bucket/a/../b", "'..' path segment"),
    ],
)
def test_malformed_urls(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_s3_url(url)


def test_unreachable_endpoint_fails_fast(local_repo: Path) -> None:
    endpoint = f"http://127.0.0.1:{find_free_port()}"  # nothing listens there
    client = s3_client(endpoint, connect_timeout=1, max_attempts=1)
    start = time.monotonic()
    with pytest.raises(ServingError, match=f"cannot reach the S3 endpoint {endpoint}"):
        remote_versions(client, "s3://bucket/prefix", ONNX)
    with pytest.raises(ServingError, match=endpoint):
        upload_model_set(local_repo, MODELS, 1, "s3://bucket/prefix", client)
    assert time.monotonic() - start < 5


def test_missing_bucket_and_local_errors(client, bucket_url: str, local_repo: Path) -> None:
    with pytest.raises(ServingError, match="NoSuchBucket"):
        remote_versions(client, "s3://no-such-bucket-here/x", ONNX)
    with pytest.raises(ConfigError, match="no version directory 3/"):
        upload_model_set(local_repo, MODELS, 3, bucket_url, client)
    with pytest.raises(ConfigError, match="not a model directory"):
        upload_model_set(local_repo, ["missing"], 1, bucket_url, client)
    assert _objects(client, bucket_url) == {}


def test_endpoint_from_environment(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDIMG_S3_ENDPOINT", moto_endpoint)
    assert s3_client().meta.endpoint_url == moto_endpoint
    assert s3_client("http://127.0.0.1:1").meta.endpoint_url == "http://127.0.0.1:1"
    monkeypatch.delenv("MEDIMG_S3_ENDPOINT")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)  # boto3 >= 1.28 reads it itself
    client = s3_client()
    assert client.meta.endpoint_url == moto_endpoint
    assert isinstance(client.list_buckets()["Buckets"], list)


def test_racing_publishes_claim_a_version_once(
    moto_endpoint: str, bucket_url: str, local_repo: Path
) -> None:
    """Two publishers list the bucket at the same moment (both see version 1 free) and
    race: the conditional write lets exactly one claim it; the other is told, by name, and
    writes nothing. A claim whose publish never uploaded is skipped, not reused."""
    import threading

    from serving.repository.s3 import VersionTaken, claim_version, claimed_versions

    barrier, results = threading.Barrier(2), {}

    def publisher(name: str) -> None:
        client = s3_client(moto_endpoint, max_attempts=1)
        version = next_remote_version(client, bucket_url, [PRE, ONNX])
        barrier.wait()  # both have listed before either claims
        try:
            claim_version(client, bucket_url, ONNX, version, note=name)
            results[name] = upload_model_set(local_repo, MODELS, version, bucket_url, client)
        except VersionTaken as exc:
            results[name] = exc

    threads = [threading.Thread(target=publisher, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    lost = [r for r in results.values() if isinstance(r, VersionTaken)]
    won = [r for r in results.values() if isinstance(r, list)]
    assert len(lost) == 1 and len(won) == 1, results
    assert "version 1 of tiny_onnx" in str(lost[0]) and "claimed by another publish" in str(lost[0])
    client = s3_client(moto_endpoint, max_attempts=1)
    assert remote_versions(client, bucket_url, ONNX) == [1]
    assert claimed_versions(client, bucket_url, ONNX) == [1]
    # a publish that claimed 2 and died: the next one takes 3
    claim_version(client, bucket_url, ONNX, 2, note="died")
    assert next_remote_version(client, bucket_url, [PRE, ONNX]) == 3
