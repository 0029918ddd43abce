"""The one PNG helper: a headless pyplot and a figure rendered to reproducible PNG bytes or a data URI.

Reports (validation, compliance, DVC plots, diffs) all draw through this, so every image is made the same way.
"""
from __future__ import annotations

import base64
import io
from typing import Any


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed); imported on first use (costs ~0.3 s)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def legend_outside(ax: Any, fontsize: int = 7, max_rows: int = 14) -> Any:
    """The axes' legend to the right of the plot area, never over the data (one column per `max_rows` entries);
    save with tight=True (the default) so the PNG widens to hold it. Returns the legend (None without labels)."""
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return None
    ncol = max(1, -(-len(handles) // max_rows))
    return ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0,
                     fontsize=fontsize, ncol=ncol, frameon=False)


def png_bytes(fig: Any, dpi: int = 100, tight: bool = True) -> bytes:
    """The figure as PNG bytes without the matplotlib version stamp (same figure -> same bytes); closes it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight" if tight else None, metadata={"Software": None})
    pyplot().close(fig)
    return buf.getvalue()


def png_data_uri(fig: Any, dpi: int = 100) -> str:
    """The figure as a `data:image/png;base64,...` URI for self-contained HTML reports; closes it."""
    return "data:image/png;base64," + base64.b64encode(png_bytes(fig, dpi=dpi)).decode("ascii")
