"""YAML for configuration files that anyone may hand us (gates, params.yaml): yaml.safe_load without anchors and
aliases, and with a size cap, so a few hundred bytes cannot expand into gigabytes ("billion laughs").

Our configuration never needs anchors; a file that uses one is refused with a one-line YAMLLimitError.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from core.errors import QuantGateError
from core.regular_file import FileTooLargeError, NotRegularFileError, read_regular_bytes

#: Largest configuration file read (bytes): gates.yaml and params.yaml are a few KB.
MAX_YAML_BYTES = 1 << 20


class YAMLLimitError(QuantGateError, ValueError):
    """A YAML file refused before or while parsing: not a regular file, too big, anchors/aliases, invalid."""


def _loader():
    import yaml

    class NoAliasSafeLoader(yaml.SafeLoader):
        """SafeLoader that refuses anchors (&a) and aliases (*a) as soon as the parser meets them."""

        def compose_node(self, parent, index):  # type: ignore[override]
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent):
                raise YAMLLimitError(f"YAML alias *{event.anchor} at line {event.start_mark.line + 1}: "
                                     "anchors and aliases are not allowed in quantgate configuration")
            anchor = getattr(event, "anchor", None)
            if anchor is not None:
                raise YAMLLimitError(f"YAML anchor &{anchor} at line {event.start_mark.line + 1}: "
                                     "anchors and aliases are not allowed in quantgate configuration")
            return super().compose_node(parent, index)

    return NoAliasSafeLoader


def safe_load_text(text: str, what: str = "YAML") -> Any:
    """Parse `text` like yaml.safe_load, refusing anchors/aliases and text over MAX_YAML_BYTES (YAMLLimitError)."""
    import yaml

    if len(text) > MAX_YAML_BYTES:
        raise YAMLLimitError(f"{what}: {len(text)} characters, more than the {MAX_YAML_BYTES} allowed")
    try:
        return yaml.load(text, Loader=_loader())  # noqa: S506 - a SafeLoader subclass
    except YAMLLimitError as e:
        raise YAMLLimitError(f"{what}: {e}") from None
    except RecursionError:
        raise YAMLLimitError(f"{what}: nested too deeply") from None
    except yaml.YAMLError as e:
        raise YAMLLimitError(f"{what}: invalid YAML: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from None


def read_regular_text(path: "str | os.PathLike[str]", max_bytes: int, what: str = "file") -> str:
    """A regular file's UTF-8 text, at most `max_bytes` bytes. FIFOs, devices and sockets are refused before any
    blocking read (core.regular_file). Raises YAMLLimitError or OSError."""
    p = Path(path)
    try:
        data = read_regular_bytes(p, max_bytes)
    except NotRegularFileError:
        raise YAMLLimitError(f"{what} {p} is not a regular file") from None
    except FileTooLargeError as e:
        if e.size < 0:
            raise YAMLLimitError(f"{what} {p} grew past the {max_bytes} bytes allowed while being read") from None
        raise YAMLLimitError(f"{what} {p} is {e.size} bytes, more than the {max_bytes} allowed") from None
    return data.decode("utf-8-sig")


def load_yaml_file(path: "str | os.PathLike[str]", what: str = "YAML file") -> Any:
    """A bounded, alias-free YAML file (see safe_load_text). Missing file: FileNotFoundError; other OS errors and
    UnicodeDecodeError propagate too, so callers keep their own wording for them."""
    return safe_load_text(read_regular_text(path, MAX_YAML_BYTES, what), f"{what} {path}")


__all__ = ["MAX_YAML_BYTES", "YAMLLimitError", "load_yaml_file", "read_regular_text", "safe_load_text"]
