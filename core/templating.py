"""The one way reports are rendered: Jinja2 templates with escaping decided by the output format.

HTML templates (`*.html.j2`) autoescape every value; Markdown templates (`*.md.j2`) pass every value through
core.text.md_escape unless it is already MdSafe (use the `code` filter for code spans). Undefined names fail.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from core.text import MdSafe, md_code, md_escape, one_line


def _md_finalize(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, MdSafe):
        return value
    return md_escape(value)


def environment(folder: Path, fmt: str) -> Any:
    """A Jinja2 environment over `folder` for `fmt` ("html" or "md") with that format's escaping."""
    import jinja2

    kw: dict[str, Any] = dict(loader=jinja2.FileSystemLoader(folder), trim_blocks=True, lstrip_blocks=True,
                              undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    if fmt == "html":
        env = jinja2.Environment(autoescape=True, **kw)
    elif fmt == "md":
        env = jinja2.Environment(autoescape=False, finalize=_md_finalize, **kw)
    else:
        raise ValueError(f"unknown template format {fmt!r} (html, md)")
    env.filters["code"] = md_code
    env.filters["one_line"] = one_line
    env.filters["md"] = md_escape
    env.filters["trusted"] = MdSafe  # text the report itself made (a base64 data URI), never input text
    return env


def render(folder: Path, name: str, **context: Any) -> str:
    """Render template `name` (its suffix, .html.j2 or .md.j2, picks the escaping) from `folder`."""
    fmt = name.removesuffix(".j2").rsplit(".", 1)[-1]
    return environment(folder, fmt).get_template(name).render(**context)
