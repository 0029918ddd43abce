"""quantgate: quantize LLM checkpoints to GGUF v3, validate them, register them with a tamper-evident record."""
from core.version import __version__

__all__ = ["__version__"]
