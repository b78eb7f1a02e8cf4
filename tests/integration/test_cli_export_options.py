"""export_model's options on a tiny real network (fast): the fp16 variant, the gpu target's
build step, and `medimg build-engine` refusing clearly where there is no TensorRT/GPU::

    python -m pytest tests/integration/test_cli_export_options.py -q
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import onnx
import pytest

from serving.export.fp16 import FP16_PARITY_ATOL
from serving.export.onnx import export_model
from serving.export.tensorrt_models import build_step_script, options_from, policy_text
from serving.repository.layout import read_config
from serving.repository.model_config import RepositoryOptions, classifier_config
from tests.fixtures.triton import tiny_module
from training.errors import ConfigError
from training.registry import LoadedModel

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def tiny_loaded(tiny_classifier_spec) -> LoadedModel:
    return LoadedModel(module=tiny_module(0), spec=tiny_classifier_spec, uri="test:tiny")


def test_fp16_variant_is_served_and_checked(tiny_loaded, data_dir, tmp_path) -> None:
    report = export_model(
        tiny_loaded, tmp_path, data_dir=str(data_dir), options=RepositoryOptions(), fp16=True
    )
    assert report.max_abs_diff <= 1e-4
    assert report.fp16_max_abs_diff is not None
    assert 0 < report.fp16_max_abs_diff <= FP16_PARITY_ATOL
    served = onnx.load(str(report.onnx_path))
    types = {init.data_type for init in served.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in types and onnx.TensorProto.FLOAT not in types, types
    io = [v.type.tensor_type.elem_type for v in [*served.graph.input, *served.graph.output]]
    assert io == [onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT]  # the config is unchanged
    assert read_config(report.models.classifier).input[0].data_type == 11  # TYPE_FP32


def test_gpu_build_step_and_engine_options(tiny_classifier_spec, tmp_path) -> None:
    opts = RepositoryOptions(
        target="gpu", max_batch_size=16, preferred_batch_sizes=(4, 8), version_policy="all"
    )
    config = classifier_config(tiny_classifier_spec, opts)
    assert policy_text(config) == "all"
    again = options_from(config, precision="FP16")
    assert (again.max_batch_size, again.preferred_batch_sizes) == (16, (4, 8))
    assert again.version_policy == "all" and again.target == "gpu"
    (tmp_path / "m_onnx").mkdir()
    script = build_step_script(tmp_path, "m", 3)
    text = script.read_text()
    assert "medimg build-engine" in text and "--model m --version 3" in text
    assert script.stat().st_mode & 0o111


def test_build_engine_says_what_is_missing(medimg_cmd, tmp_path: Path) -> None:
    result = subprocess.run(
        [*medimg_cmd, "build-engine", "--repository", str(tmp_path), "--model", "m"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "TensorRT" in result.stderr or "GPU" in result.stderr, result.stderr
    assert not (tmp_path / "m_trt").exists()  # nothing written


def test_bad_export_options_fail_before_any_work(medimg_cmd, tmp_path: Path) -> None:
    cases = [
        (["--trt-precision", "FP32"], "--target gpu"),  # would be ignored on cpu: refused
        (["--version-policy", "newest"], "version_policy"),
        (["--max-batch-size", "0"], "max_batch_size"),
        (["--preferred-batch-sizes", "8,x"], "comma-separated integers"),
    ]
    cases.append((["--s3-endpoint", "http://127.0.0.1:9"], "s3://bucket/prefix"))  # publish
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    procs = [
        subprocess.Popen(
            [
                *medimg_cmd,
                "publish" if "--s3-endpoint" in args else "export",
                "--model",
                "m",
                "--repository",
                str(tmp_path),
                *args,
            ],
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args, _ in cases
    ]
    for proc, (args, named) in zip(procs, cases, strict=True):
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode != 0, args
        assert named in stderr, (args, stderr[-1000:])
    assert not (tmp_path / "mlflow.db").exists()  # refused before MLflow was touched


@pytest.mark.parametrize("command", ["export", "publish"])
def test_cli_batching_defaults_are_the_measured_ones(command) -> None:
    """No batching flag: RepositoryOptions' defaults (not argparse's own); '' and 0 turn
    the preferred sizes and the delay off; a value is taken as given."""
    from serving.cli import build_parser
    from serving.cli.options import repository_options

    parser = build_parser()
    base = [command] + (["--model", "m"] if command == "export" else [])
    unset = repository_options(parser.parse_args(base))
    defaults = RepositoryOptions()
    assert (unset.preferred_batch_sizes, unset.max_queue_delay_us) == (
        defaults.preferred_batch_sizes,
        defaults.max_queue_delay_us,
    )
    off = repository_options(
        parser.parse_args([*base, "--preferred-batch-sizes", "", "--max-queue-delay-us", "0"])
    )
    assert (off.preferred_batch_sizes, off.max_queue_delay_us) == ((), 0)
    given = repository_options(
        parser.parse_args([*base, "--preferred-batch-sizes", "4,16", "--max-queue-delay-us", "70"])
    )
    assert (given.preferred_batch_sizes, given.max_queue_delay_us) == ((4, 16), 70)
    assert unset.borrow_idle_cores
    assert not repository_options(
        parser.parse_args([*base, "--no-borrow-idle-cores"])
    ).borrow_idle_cores
    with pytest.raises(ConfigError, match="--no-borrow-idle-cores applies to --target cpu"):
        repository_options(parser.parse_args([*base, "--target", "gpu", "--no-borrow-idle-cores"]))
