"""core.png: reproducible PNG bytes, and legends that never cover the data."""
from __future__ import annotations

import numpy as np

from core.png import legend_outside, png_bytes, pyplot


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def _figure(n_series: int):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3))
    x = np.arange(10)
    for i in range(n_series):   # lines that fill the whole plot area, corners included
        ax.plot(x, (x * (i + 1)) % 10, "o-", label=f"series {i}")
    return fig, ax


def test_legend_sits_outside_the_plot_area_for_few_and_many_series():
    for n in (2, 9, 30):
        fig, ax = _figure(n)
        leg = legend_outside(ax)
        fig.canvas.draw()
        r = fig.canvas.get_renderer()
        assert not _overlaps(leg.get_window_extent(r), ax.get_window_extent(r)), n
        assert leg._ncols == (1 if n <= 14 else 3)
        pyplot().close(fig)


def test_tight_png_holds_the_legend_and_is_reproducible():
    import io

    from PIL import Image

    fig, ax = _figure(3)
    legend_outside(ax)
    a = png_bytes(fig)
    fig, ax = _figure(3)
    plain = png_bytes(fig)
    fig, ax = _figure(3)
    legend_outside(ax)
    assert png_bytes(fig) == a                                  # same figure, same bytes
    assert Image.open(io.BytesIO(a)).width > Image.open(io.BytesIO(plain)).width   # widened for the legend


def test_no_labels_no_legend():
    plt = pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    assert legend_outside(ax) is None
    plt.close(fig)
