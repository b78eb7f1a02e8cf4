"""Shared pytest fixtures; each area keeps its own in a tests/*_fixtures.py module."""

from tests.fixtures.pipeline import *  # noqa: F403
from tests.fixtures.ray_cluster import *  # noqa: F403
from tests.fixtures.s3 import *  # noqa: F403
from tests.fixtures.triton import *  # noqa: F403
