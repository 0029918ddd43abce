"""Untrusted text made safe for where it goes: one terminal line, Markdown prose, a Markdown code span.

Tensor names, paths, model names, MLflow tags and dataset text come from files anyone can write; they are shown
literally, never interpreted as markup (HTML escaping is Jinja2's autoescape, see core.templating).
"""
from __future__ import annotations

import re

#: Longest error or table cell printed on one line; longer text is cut with a marker.
MAX_LINE = 500

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]<>#|~&!])")


class MdSafe(str):
    """Markdown that is already safe (a code span, or text a template built): not escaped again."""


def one_line(text: object, limit: int = MAX_LINE) -> str:
    """`text` on one line: control and bidi characters shown as \\xNN / \\uNNNN, newlines as spaces, cut to `limit`."""
    s = str(text).replace("\r\n", " ").replace("\n", " ").replace("\r", " ")
    s = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}", s)
    if len(s) > limit:
        s = s[: limit - 20] + f"... [{len(s) - limit + 20} more chars]"
    return s


def md_escape(text: object, limit: int = MAX_LINE) -> MdSafe:
    """`text` as literal Markdown prose: every character Markdown (or the HTML it may embed) would interpret is
    backslash-escaped, on one line."""
    if isinstance(text, MdSafe):
        return text
    return MdSafe(_MD_SPECIAL.sub(r"\\\1", one_line(text, limit)))


def md_code(text: object, limit: int = MAX_LINE) -> MdSafe:
    """`text` as one Markdown code span, whatever backticks it holds: the fence is one backtick longer than its
    longest run of backticks (CommonMark), padded with spaces."""
    s = one_line(text, limit)
    longest = max((len(m) for m in re.findall(r"`+", s)), default=0)
    fence = "`" * (longest + 1)
    return MdSafe(f"{fence} {s} {fence}")


def md_cell(text: object, limit: int = MAX_LINE) -> MdSafe:
    """Text for a Markdown table cell (escaped prose; `|` escaped too)."""
    return md_escape(text, limit)
