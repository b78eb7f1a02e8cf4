"""`medimg serve --repository s3://...`: the repository named as tritonserver takes it
(medimg's form with the endpoint apart, as `publish` takes it, or Triton's own), and explicit
mode refused for a remote repository (its token file needs a local folder). Serving from
S3 for real: tests/infra/test_loopback_cluster.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

MEDIMG = str(Path(sys.executable).parent / "medimg")


def test_serve_names_s3_repositories_as_triton_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """`medimg serve --repository s3://...`: medimg's form (endpoint apart, as `publish` takes
    it) becomes Triton's own; Triton's own passes through; explicit mode is refused (its
    token file needs a local repository)."""
    from serving.server.config import ServerConfig, triton_s3_url
    from training.errors import ConfigError

    for name in ("MEDIMG_S3_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    assert triton_s3_url("s3://b/p/", "http://127.0.0.1:9000") == "s3://http://127.0.0.1:9000/b/p"
    assert triton_s3_url("s3://b/p") == "s3://b/p"  # AWS itself
    monkeypatch.setenv("AWS_ENDPOINT_URL", "https://minio.example:443")
    assert triton_s3_url("s3://b/p") == "s3://https://minio.example:443/b/p"
    assert triton_s3_url("s3://127.0.0.1:9000/b/p") == "s3://127.0.0.1:9000/b/p"
    with pytest.raises(ConfigError, match="needs http"):
        triton_s3_url("s3://b/p", "minio:9000")
    remote = ServerConfig("s3://127.0.0.1:9000/b/p")
    assert remote.remote and "--model-repository=s3://127.0.0.1:9000/b/p" in remote.to_args(
        Path("/home"), shm_prefix="x"
    )
    with pytest.raises(ConfigError, match="explicit model control needs a local repository"):
        ServerConfig("s3://b/p", model_control_mode="explicit")
    result = subprocess.run(
        [MEDIMG, "serve", "--repository", "model_repository", "--s3-endpoint", "http://x:1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1 and "needs an s3://BUCKET/PREFIX" in result.stderr
