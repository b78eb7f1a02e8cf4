"""Where Ray keeps checkpoints: a local or shared directory, or object storage.

Multi-node Ray Train needs storage every node reaches: a shared file system or ``s3://``.
On AWS, ``--storage-path s3://BUCKET/PREFIX`` is enough (Ray and pyarrow find the region
and credentials the usual way). For an S3-compatible store (MinIO, Ceph, moto) name its
endpoint with ``--storage-endpoint URL``, else ``$MEDIMG_S3_ENDPOINT``, else
``$AWS_ENDPOINT_URL_S3`` / ``$AWS_ENDPOINT_URL`` (the variables ``medimg publish`` reads
too): Ray then gets a pyarrow ``S3FileSystem`` for that endpoint and the path inside it.
Credentials come from the environment of every Ray process (``AWS_ACCESS_KEY_ID`` ...)::

    medimg train --workers 2 --ray-address auto --storage-path s3://medimg-ray/checkpoints \
        --storage-endpoint http://minio.medimg.svc:9000
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from training.errors import ConfigError

ENDPOINT_ENVS = ("MEDIMG_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
DEFAULT_REGION = "us-east-1"


@dataclass(frozen=True)
class RayStorage:
    """What Ray's ``RunConfig``/``Tuner.restore`` take: ``storage_path`` and, for an
    S3-compatible endpoint, ``storage_filesystem`` (None: Ray resolves the path itself)."""

    path: str
    filesystem: Any = None

    def kwargs(self) -> dict[str, Any]:
        return {"storage_path": self.path, "storage_filesystem": self.filesystem}


def storage_endpoint(explicit: str = "") -> str:
    """The S3 endpoint URL to use: ``explicit``, else the first variable of
    :data:`ENDPOINT_ENVS` that is set; "" for AWS itself."""
    return explicit or next((os.environ[v] for v in ENDPOINT_ENVS if os.environ.get(v)), "")


def check_endpoint(endpoint: str) -> None:
    parsed = urlparse(endpoint)
    if parsed.scheme not in ("http", "https") or not parsed.netloc or parsed.path not in ("", "/"):
        raise ConfigError(
            f"--storage-endpoint {endpoint!r}: expected http(s)://HOST[:PORT] (no path)"
        )


def resolve(uri: str, endpoint: str = "") -> tuple[Any, str]:
    """(pyarrow file system, path inside it) of a file or folder ``uri`` in this storage:
    a local path, ``s3://`` (with the endpoint, as :func:`ray_storage`) or another URI."""
    storage = ray_storage(uri, endpoint) if uri.startswith("s3://") else RayStorage(uri)
    if storage.filesystem is not None:
        return storage.filesystem, storage.path
    from pyarrow import fs

    return fs.FileSystem.from_uri(uri if "://" in uri else f"file://{uri}")


def ray_storage(storage_path: str, endpoint: str = "") -> RayStorage:
    """The storage for ``storage_path``; an ``s3://`` path with an endpoint (explicit or
    from the environment) gets a pyarrow ``S3FileSystem`` for it."""
    if not storage_path.startswith("s3://"):
        if endpoint:
            raise ConfigError(
                f"--storage-endpoint {endpoint} needs an s3:// --storage-path, got {storage_path!r}"
            )
        return RayStorage(storage_path)
    endpoint = storage_endpoint(endpoint)
    if not endpoint:
        return RayStorage(storage_path)
    check_endpoint(endpoint)
    from pyarrow import fs

    parsed = urlparse(endpoint)
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION
    filesystem = fs.S3FileSystem(
        endpoint_override=parsed.netloc, scheme=parsed.scheme, region=region
    )
    return RayStorage(storage_path.removeprefix("s3://").rstrip("/"), filesystem)
