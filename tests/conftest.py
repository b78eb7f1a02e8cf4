"""Shared pytest fixtures; each area keeps its own in a tests/*_fixtures.py module."""

from pipeline_fixtures import *  # noqa: F403
from ray_cluster import *  # noqa: F403
from s3_fixtures import *  # noqa: F403
from triton_fixtures import *  # noqa: F403
