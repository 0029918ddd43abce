"""The tool version every record, job key and GGUF provenance key carries."""
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

try:
    __version__ = _version("quantgate")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.1.0"
