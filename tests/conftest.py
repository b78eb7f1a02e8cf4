"""Shared pytest fixtures; each area keeps its own in a tests/*_fixtures.py module."""

from tests.fixtures.k8s import objs, overlay  # noqa: F401 (infra/k8s's rendered overlays)
from tests.fixtures.pipeline import *  # noqa: F403
from tests.fixtures.ray_cluster import *  # noqa: F403
from tests.fixtures.s3 import *  # noqa: F403
from tests.fixtures.triton import *  # noqa: F403
