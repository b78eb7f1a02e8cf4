"""Publish medimg model repositories to ``s3://bucket/prefix``, which Triton reads natively.

Credentials come from the usual boto3 chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
``AWS_PROFILE``, instance roles); the endpoint from ``endpoint_url``, else ``MEDIMG_S3_ENDPOINT``,
else ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL`` (read by boto3 >= 1.28 itself), else AWS::

    python -c "from pathlib import Path; from serving.repository.s3 import *; c, u = s3_client(), \
's3://models/triton'; m = 'pneumoniamnist-densenet121'; ms = [m + '_preprocess', m + '_onnx', m]; \
print(upload_model_set(Path('model_repository'), ms, 1, u, c), remote_versions(c, u, m + '_onnx'))"

Triton serves it with ``--model-repository=s3://models/triton`` (AWS) or
``s3://http://HOST:PORT/models/triton`` (MinIO, Ceph, moto). S3 has no atomic rename: prefer
``--model-control-mode=explicit`` and a load request after uploading, as a polling server
may see a version directory whose files are still arriving.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from training.errors import ConfigError, ServingError

__all__ = [
    "VersionTaken",
    "check_bucket",
    "claim_version",
    "claimed_versions",
    "download_repository",
    "next_remote_version",
    "parse_s3_url",
    "remote_versions",
    "s3_client",
    "upload_model_set",
]

CONFIG_FILE = "config.pbtxt"
CLAIM = ".medimg-version-{}.claim"  # a file in the model directory; Triton reads directories
ENDPOINT_ENV = "MEDIMG_S3_ENDPOINT"
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
# Triton ignores version directories that are not numeric or that start with 0
# (docs/user_guide/model_repository.md, "Model Versions").
_VERSION = re.compile(r"[1-9][0-9]*")


class VersionTaken(ServingError):
    """Another publish claimed the version first."""


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/a/b/`` -> ``("bucket", "a/b")``; repeated slashes collapse, as in Triton."""
    if not isinstance(url, str) or not url.startswith("s3://"):
        raise ConfigError(f"not an S3 URL: {url!r}; expected s3://BUCKET[/PREFIX]")
    bucket, _, prefix = url[len("s3://") :].partition("/")
    if not bucket:
        raise ConfigError(f"S3 URL {url!r} has no bucket; expected s3://BUCKET[/PREFIX]")
    if ":" in bucket:
        raise ConfigError(
            f"S3 URL {url!r} names an endpoint (Triton's s3://HOST:PORT/BUCKET form); use "
            f"s3://BUCKET/PREFIX here and pass the endpoint as endpoint_url or ${ENDPOINT_ENV}"
        )
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise ConfigError(
            f"S3 URL {url!r}: {bucket!r} is not a valid bucket name "
            "(3-63 lowercase letters, digits, '.' or '-')"
        )
    parts = [p for p in prefix.split("/") if p]
    if any(p in (".", "..") for p in parts):
        raise ConfigError(f"S3 URL {url!r} has a '.' or '..' path segment")
    return bucket, "/".join(parts)


def s3_client(
    endpoint_url: str | None = None,
    *,
    connect_timeout: float = 10.0,
    read_timeout: float = 60.0,
    max_attempts: int = 3,
) -> Any:
    """A boto3 S3 client; ``max_attempts`` counts the first try. A custom endpoint gets
    path-style addressing (``http://host:port/bucket/key``), as Triton uses."""
    import boto3
    from botocore.config import Config

    endpoint_url = endpoint_url or os.environ.get(ENDPOINT_ENV) or None
    custom = (
        endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    )
    config = Config(
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"mode": "standard", "total_max_attempts": max_attempts},
        s3={"addressing_style": "path"} if custom else None,
    )
    try:
        return boto3.client("s3", endpoint_url=endpoint_url, config=config)
    except ValueError as exc:  # botocore rejects a malformed endpoint URL with ValueError
        raise ConfigError(f"S3 endpoint {endpoint_url!r} is not a valid URL: {exc}") from exc


@contextmanager
def _s3_errors(client: Any, what: str) -> Iterator[None]:
    """botocore/boto3 failures as ServingError naming the endpoint and the operation."""
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError, ConnectionError, NoCredentialsError

    endpoint = getattr(getattr(client, "meta", None), "endpoint_url", None) or "(AWS default)"
    try:
        yield
    except NoCredentialsError as exc:
        raise ServingError(
            f"{what}: no AWS credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)"
        ) from exc
    except ConnectionError as exc:
        raise ServingError(
            f"cannot reach the S3 endpoint {endpoint} ({what}): {exc}; check endpoint_url / "
            f"${ENDPOINT_ENV} / AWS_ENDPOINT_URL and that the server is up"
        ) from exc
    except (ClientError, BotoCoreError, Boto3Error) as exc:  # NoSuchBucket, AccessDenied...
        raise ServingError(f"S3 endpoint {endpoint} failed to {what}: {exc}") from exc


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p.strip("/"))


def _list(client: Any, bucket: str, prefix: str, delimiter: str = "") -> Iterator[dict[str, Any]]:
    kwargs = {"Bucket": bucket, "Prefix": prefix} | ({"Delimiter": delimiter} if delimiter else {})
    with _s3_errors(client, f"list s3://{bucket}/{prefix}"):
        yield from client.get_paginator("list_objects_v2").paginate(**kwargs)


def check_bucket(client: Any, url: str) -> None:
    """The bucket of ``url`` answers (one HEAD request): an unreachable endpoint, missing
    credentials or a missing bucket fail here, naming the endpoint, before any work."""
    bucket, _ = parse_s3_url(url)
    with _s3_errors(client, f"reach bucket {bucket}"):
        client.head_bucket(Bucket=bucket)


def remote_versions(client: Any, url: str, model: str) -> list[int]:
    """Sorted version numbers ("directories" ``prefix/model/<n>/``) the bucket holds."""
    bucket, prefix = parse_s3_url(url)
    base = _join(prefix, model) + "/"
    names = {
        cp["Prefix"][len(base) :].rstrip("/")
        for page in _list(client, bucket, base, "/")
        for cp in page.get("CommonPrefixes", [])
    }
    return sorted(int(n) for n in names if _VERSION.fullmatch(n))


def claimed_versions(client: Any, url: str, model: str) -> list[int]:
    """Sorted version numbers claimed for ``model`` (:func:`claim_version`), published or not."""
    bucket, prefix = parse_s3_url(url)
    base = _join(prefix, model) + "/"
    head, tail = CLAIM.split("{}")
    found = []
    for page in _list(client, bucket, base + head, "/"):
        for obj in page.get("Contents", []):
            name = obj["Key"][len(base) :]
            number = name[len(head) : len(name) - len(tail)]
            if name.startswith(head) and name.endswith(tail) and _VERSION.fullmatch(number):
                found.append(int(number))
    return sorted(found)


def next_remote_version(client: Any, url: str, models: str | Iterable[str]) -> int:
    """One past the highest version of any of ``models`` the bucket holds or that a publish
    claimed (1 if none): a claim left by a publish that died is skipped, never reused."""
    names = [models] if isinstance(models, str) else list(models)
    taken = [v for m in names for v in remote_versions(client, url, m)]
    taken += [v for m in names for v in claimed_versions(client, url, m)]
    return max(taken, default=0) + 1


def claim_version(client: Any, url: str, model: str, version: int, note: str = "") -> str:
    """Claim ``version`` of ``model`` before writing it: a conditional write
    (``If-None-Match: *``) of ``<model>/.medimg-version-<N>.claim`` that only one of two
    racing publishes can make; the other gets a :class:`VersionTaken`. Returns the key.

    A file beside the version directories, which Triton ignores. Stores that ignore the
    condition (S3 before August 2024 did; MinIO and moto honour it) let both writes
    succeed: there the claim cannot stop a race (docs/commands/publish.md)."""
    from botocore.exceptions import ClientError

    bucket, prefix = parse_s3_url(url)
    key = _join(prefix, model, CLAIM.format(version))
    try:
        with _s3_errors(client, f"claim s3://{bucket}/{key}"):
            client.put_object(Bucket=bucket, Key=key, Body=note.encode(), IfNoneMatch="*")
    except ServingError as exc:
        cause = exc.__cause__
        status = getattr(cause, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
        if isinstance(cause, ClientError) and status in (409, 412):
            raise VersionTaken(
                f"version {version} of {model} at {url} was claimed by another publish "
                f"(s3://{bucket}/{key} exists); nothing was written: publish again for the "
                "next version"
            ) from cause
        raise
    return key


def _files(root: Path) -> list[Path]:
    """Regular files under ``root``, sorted, skipping dot-files (staging dirs, editor files)."""
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not any(s.startswith(".") for s in p.relative_to(root).parts)
    )


def upload_model_set(
    local_repository: Path, models: list[str], version: int, url: str, client: Any
) -> list[str]:
    """Upload version ``version`` of ``models`` and their model-level files; the keys, in order.

    All version files first, then model-level files (labels, ``warmup/``...), then each
    model's ``config.pbtxt`` in the order of ``models`` (list composing models before the
    ensemble). An existing remote ``<model>/<version>/`` is never written: if any model's
    has objects, nothing is uploaded. An empty version directory becomes a zero-byte
    marker key ``<model>/<version>/``. A model without a local ``<version>/`` whose version
    directories are all empty (an ensemble: its version is its config) gets only its
    config, labels and the markers the bucket lacks."""
    if version < 1 or not models:
        raise ConfigError(f"need models and a version >= 1, got {models!r} and {version}")
    bucket, prefix = parse_s3_url(url)
    local_repository = Path(local_repository)
    # (file, key) to upload, in three stages; file None: a directory marker key
    versioned: list[tuple[Path | None, str]] = []
    model_level: list[tuple[Path | None, str]] = []
    configs: list[tuple[Path | None, str]] = []
    for model in models:
        model_dir = local_repository / model
        if not (model_dir / CONFIG_FILE).is_file():
            raise ConfigError(f"{model_dir} is not a model directory (no {CONFIG_FILE})")
        base = _join(prefix, model)
        numeric = sorted(
            d for d in model_dir.iterdir() if d.is_dir() and _VERSION.fullmatch(d.name)
        )
        if (model_dir / str(version)).is_dir():
            dirs, required = [model_dir / str(version)], True
        elif numeric and not any(_files(d) for d in numeric):
            dirs, required = numeric, False
        else:
            raise ConfigError(f"{model_dir} has no version directory {version}/")
        for vdir in dirs:
            vprefix = f"{base}/{vdir.name}/"
            with _s3_errors(client, f"list s3://{bucket}/{vprefix}"):
                existing = client.list_objects_v2(Bucket=bucket, Prefix=vprefix, MaxKeys=1)
            if existing.get("Contents"):
                if required:
                    raise ConfigError(
                        f"s3://{bucket}/{vprefix} already exists (holds "
                        f"{existing['Contents'][0]['Key']}); versions are "
                        "never overwritten: publish as next_remote_version() instead"
                    )
                continue
            files = _files(vdir)
            versioned += [(f, _join(base, f.relative_to(model_dir).as_posix())) for f in files]
            if not files:
                # Triton's S3 filesystem takes "<dir>" as a directory when listing "<dir>/"
                # returns any object, and skips the key "<dir>/" itself ("In the case of empty
                # directories, the directory itself will appear here"): IsDirectory and
                # GetDirectoryContents in triton-inference-server/core
                # src/filesystem/implementations/s3.h. So a zero-byte "NAME/1/" is an empty dir.
                versioned.append((None, vprefix))
        for f in _files(model_dir):
            rel = f.relative_to(model_dir).as_posix()
            head, sep, _ = rel.partition("/")
            if not (sep and head.isdigit()):  # version directories: above, or not in this set
                (configs if rel == CONFIG_FILE else model_level).append((f, _join(base, rel)))
    uploaded = []
    for path, key in versioned + model_level + configs:
        with _s3_errors(client, f"upload s3://{bucket}/{key}"):
            if path is None:
                client.put_object(Bucket=bucket, Key=key, Body=b"")
            else:
                client.upload_file(str(path), bucket, key)
        uploaded.append(key)
    return uploaded


def download_repository(url: str, dest: Path, client: Any) -> list[Path]:
    """Mirror every key under ``url`` into ``dest``; ``<dir>/`` marker keys become empty
    directories. Returns the files written."""
    bucket, prefix = parse_s3_url(url)
    base = prefix + "/" if prefix else ""
    dest = Path(dest)
    written = []
    for page in _list(client, bucket, base):
        for obj in page.get("Contents", []):
            key = obj["Key"]
            parts = [p for p in key[len(base) :].split("/") if p]
            if any(p in (".", "..") for p in parts):
                raise ServingError(
                    f"refusing to download s3://{bucket}/{key}: '.' or '..' in the key"
                )
            target = dest.joinpath(*parts)
            if key.endswith("/"):
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with _s3_errors(client, f"download s3://{bucket}/{key}"):
                client.download_file(bucket, key, str(target))
            written.append(target)
    return written
