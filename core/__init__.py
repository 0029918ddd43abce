"""The ground floor: records, errors, canonical JSON and hashing, atomic writes, the version.

Imports nothing of quantgate's own; every other package may import it (docs/ARCHITECTURE.md).
"""
from core.version import __version__

__all__ = ["__version__"]
