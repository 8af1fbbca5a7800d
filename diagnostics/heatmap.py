"""The layer × module-type cosine heatmap as a PNG (needs matplotlib: the `plots` extra).

Drawn with matplotlib's object API and the Agg canvas, never pyplot: no global backend is switched
and no GUI is touched, so it is safe inside a merge running in any process or thread.
"""

import contextlib
import logging
import threading
from typing import Iterator, List, Optional, Tuple

from finmerge.diagnostics.aggregate import Aggregates
from finmerge.diagnostics.render import layer_label

LOG = logging.getLogger(__name__)
LABELLED_CELLS = 80
MISSING = "matplotlib is not installed (pip install 'finmerge[plots]')"


def _import_matplotlib() -> None:
    try:
        import matplotlib.backends.backend_agg  # noqa: F401
        import matplotlib.colors  # noqa: F401
        import matplotlib.figure  # noqa: F401
    except ImportError:
        pass  # draw_heatmap reports it


@contextlib.contextmanager
def matplotlib_preloaded() -> Iterator[threading.Thread]:
    """Import matplotlib (a noticeable share of a small merge) in a thread while the tensors are measured.

    The thread never outlives the block: it is joined on the way out, whatever ends the block. A
    thread still inside an import when the interpreter shuts down (an early error exits at once) is
    stopped by CPython where it stands; inside a C++ extension's initialisation (kiwisolver,
    matplotlib's ft2font) that unwinding ends in `std::terminate`: the process aborts (SIGABRT)
    after printing its clean error. Not a daemon either, so even a join cut short by a second Ctrl-C
    is waited for at exit rather than torn down mid-import.
    """
    thread = threading.Thread(target=_import_matplotlib, name="finmerge-preload-matplotlib", daemon=False)
    thread.start()
    try:
        yield thread
    finally:
        thread.join()


def cosine_grid(agg: Aggregates) -> Tuple[List[str], List[str], List[List[Optional[float]]]]:
    layers = list(agg.by_layer) + ([None] if agg.has_non_layer else [])
    modules = agg.module_types
    grid = [[None if agg.cell(l, m) is None else agg.cell(l, m).cos for m in modules] for l in layers]
    return [layer_label(l) for l in layers], modules, grid


def draw_heatmap(agg: Aggregates, path: str) -> Optional[str]:
    """Write the PNG; return None, or why it was not drawn (matplotlib missing: not an error)."""
    try:
        import numpy as np
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.colors import TwoSlopeNorm
        from matplotlib.figure import Figure
    except ImportError:
        LOG.warning("diagnostics heatmap not drawn: %s; diagnostics.md has the same numbers", MISSING)
        return MISSING
    rows, columns, grid = cosine_grid(agg)
    if not rows or not columns:
        return "no tensors were measured"
    values = np.ma.masked_invalid(np.array([[np.nan if v is None else v for v in r] for r in grid], dtype=float))
    # symmetric scale around 0 sized to the data: cosines near 0 must still show their structure
    limit = max(0.05, float(np.abs(values).max()) if values.count() else 0.05)
    figure = Figure(figsize=(max(5.0, 2.5 + 0.6 * len(columns)), 2.2 + 0.25 * len(rows)), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    cmap = _colormap()
    image = axes.imshow(values, cmap=cmap, norm=TwoSlopeNorm(0.0, -limit, limit), aspect="auto", interpolation="nearest")
    axes.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
    axes.set_yticks(range(len(rows)), rows, fontsize=8 if len(rows) <= 48 else 5)
    axes.set_xlabel("module type")
    axes.set_ylabel("layer")
    axes.set_title("cos(τ_d, τ_i) per layer and module type\n(grey: undefined or absent)", fontsize=10)
    # Numbers in the cells only for small grids: text is most of the drawing time (diagnostics.md
    # has every number), and each merge of a real model pays for it.
    if len(rows) * len(columns) <= LABELLED_CELLS:
        for y, line in enumerate(grid):
            for x, v in enumerate(line):
                if v is not None:
                    axes.text(x, y, f"{v:+.2f}", ha="center", va="center", fontsize=6)
    figure.colorbar(image, ax=axes, label="cosine", fraction=0.05, pad=0.03)
    # fixed margins instead of tight_layout(), which lays the figure out twice
    figure.subplots_adjust(left=0.15, right=0.86, bottom=1.0 / figure.get_figheight(), top=1 - 0.7 / figure.get_figheight())
    figure.savefig(path)
    return None


def _colormap():
    from matplotlib import colormaps

    return colormaps["RdBu_r"].with_extremes(bad="lightgrey")
