"""quantgate: quantize LLM checkpoints to GGUF v3, validate them, register them with a tamper-evident record."""
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("quantgate")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.1.0"
