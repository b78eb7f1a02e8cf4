"""The exceptions medimg raises for problems a user can act on.

Every command catches :class:`MedimgError`, prints its message and exits non-zero;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class MedimgError(Exception):
    """Base class: the message says what is wrong and what to do about it."""


class DataError(MedimgError):
    """A data set or image file is missing, unreadable or of the wrong shape."""


class ConfigError(MedimgError):
    """An option or configuration value is out of range or unknown."""


class TrainingError(MedimgError):
    """Training failed or produced no usable checkpoint."""


class RegistryError(MedimgError):
    """A model, version or run cannot be found in MLflow."""


class ExportError(MedimgError):
    """ONNX export or its parity check failed."""


class GateError(MedimgError):
    """A model version did not pass the promotion gate (``--gate``): not published."""


class ServingError(MedimgError):
    """The Triton server cannot start, or a client cannot reach or use it."""


class RequestRefused(ServingError):
    """The server answered a request with a client error (HTTP 4xx, gRPC INVALID_ARGUMENT):
    the input is at fault, not the connection."""
