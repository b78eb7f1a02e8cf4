"""The infra group's fixture: the loopback stack (tests/infra/stack.py)."""

from tests.infra.stack import stack  # noqa: F401
