"""Error types for bad input: each one means "the input is unusable", with a message a user can act on."""
from __future__ import annotations


class QuantGateError(Exception):
    """Base class of every error quantgate reports to a user as one clear line."""


class ServiceUnavailable(QuantGateError):
    """A service the operation needs could not be reached (MLflow tracking server refused or timed out): the input
    may be fine, so a Celery task retries it with backoff; a CLI command reports it as one error line."""


class UnsupportedTypeError(QuantGateError, ValueError):
    """A ggml type or mix name we do not know or cannot produce."""


class ShapeError(QuantGateError, ValueError):
    """A tensor whose shape does not fit the requested type (e.g. row length not a multiple of the block)."""


class NonFiniteError(QuantGateError, ValueError):
    """NaN or Inf in a tensor that is about to be quantized."""


class GGUFFormatError(QuantGateError, ValueError):
    """A GGUF file that is corrupt, truncated or violates the spec."""


class CheckpointError(QuantGateError, ValueError):
    """A checkpoint that cannot be loaded (missing, corrupt, unsafe, unsupported)."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle that would need to execute code to load: refused, never executed."""


class ImatrixRequiredError(CheckpointError):
    """A tensor type that ggml/llama-quantize only produce with an importance matrix, requested without one (or
    with an imatrix that lacks the tensor)."""


class QuantizationError(QuantGateError, ValueError):
    """An input ggml's quantizer for the requested type cannot handle (ggml itself would abort on it)."""
