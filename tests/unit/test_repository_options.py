"""serving.repository.model_config.options_from_config: a repository written with some
RepositoryOptions reads back as those options, through the real writer and reader::

    python -m pytest tests/unit/test_repository_options.py -q
"""

from __future__ import annotations

import pytest

from serving.repository.layout import read_config, write_config, write_model_set
from serving.repository.model_config import (
    RepositoryOptions,
    options_from_config,
    parse_version_policy,
    version_policy_text,
)
from training.errors import ConfigError

pytestmark = pytest.mark.timeout(300)

OPTIONS = [
    RepositoryOptions(),
    RepositoryOptions(
        max_batch_size=16,
        preferred_batch_sizes=(),
        max_queue_delay_us=0,
        instance_count=1,
        preprocess_instance_count=2,
        intra_op_threads=2,
        borrow_idle_cores=False,
        version_policy="all",
        warmup=False,
        max_image_bytes=1 << 20,
    ),
    RepositoryOptions(
        preferred_batch_sizes=(4, 8, 16),
        max_queue_delay_us=2000,
        instance_count=3,
        version_policy="specific:1,3",
    ),
    RepositoryOptions(
        target="gpu",
        trt_precision="FP32",
        intra_op_threads=3,
        instance_count=2,
        version_policy="latest:2",
    ),
    RepositoryOptions(target="gpu", preferred_batch_sizes=(8, 32), warmup=False),
]


@pytest.mark.parametrize("options", OPTIONS, ids=range(len(OPTIONS)))
def test_a_written_repository_reads_back_as_its_options(
    options, tmp_path, tiny_classifier_spec, tiny_classifier_onnx
):
    models = write_model_set(tmp_path, tiny_classifier_spec, tiny_classifier_onnx, options)
    classifier, preprocess = read_config(models.classifier), read_config(models.preprocess)
    assert options_from_config(classifier, preprocess) == options


def test_without_the_preprocess_config_its_options_keep_their_defaults(
    tmp_path, tiny_classifier_spec, tiny_classifier_onnx
):
    options = RepositoryOptions(instance_count=1, preprocess_instance_count=2, max_image_bytes=99)
    models = write_model_set(tmp_path, tiny_classifier_spec, tiny_classifier_onnx, options)
    read = options_from_config(read_config(models.classifier))
    assert read.instance_count == 1
    assert (read.preprocess_instance_count, read.max_image_bytes) == (
        RepositoryOptions().preprocess_instance_count,
        RepositoryOptions().max_image_bytes,
    )


@pytest.mark.parametrize("text", ["latest:1", "latest:3", "all", "specific:2", "specific:1,4"])
def test_version_policy_text_inverts_the_parser(text):
    assert version_policy_text(parse_version_policy(text)) == text


def test_a_hand_edited_config_that_makes_no_options_names_the_model(
    tmp_path, tiny_classifier_spec, tiny_classifier_onnx
):
    models = write_model_set(tmp_path, tiny_classifier_spec, tiny_classifier_onnx)
    config = read_config(models.classifier)
    config.parameters["intra_op_threads"].string_value = "many"
    write_config(models.classifier, config)
    with pytest.raises(ConfigError, match=f"model config {models.classifier.name}: .*'many'"):
        options_from_config(read_config(models.classifier))
    config.parameters["intra_op_threads"].string_value = "-1"
    write_config(models.classifier, config)
    with pytest.raises(ConfigError, match="intra_op_threads must be >= 0"):
        options_from_config(read_config(models.classifier))
