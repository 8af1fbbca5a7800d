"""The layer × module-type cosine heatmap as an SVG: coloured cells, labels and a colour bar.

Written as text, with no plotting library: every merge draws it, and matplotlib cost a small merge
more than the statistics themselves (~0.7 s to import, ~0.7 s to draw and save a figure; 10–15 % of a
150M-parameter merge), besides loading C++ extensions into the merge process. Browsers, GitHub and
editors display SVG; diagnostics.md holds the same numbers as a table.
"""

from typing import List, Optional, Tuple
from xml.sax.saxutils import escape

from finmerge.diagnostics.aggregate import Aggregates
from finmerge.diagnostics.render import layer_label

LABELLED_CELLS = 80  # numbers inside the cells only for grids this small; larger ones show them on hover
# matplotlib's RdBu_r: blue (opposed) through near-white (orthogonal) to red (aligned)
_STOPS = ("#053061", "#2166ac", "#4393c3", "#92c5de", "#d1e5f0", "#f7f7f7",
          "#fddbc7", "#f4a582", "#d6604d", "#b2182b", "#67001f")
MISSING_COLOUR = "#d3d3d3"  # undefined cosine (a zero task vector) or a module type the layer lacks
CELL_W, CELL_H, LEFT, TOP, BAR_W = 64, 16, 104, 64, 14


def cosine_grid(agg: Aggregates) -> Tuple[List[str], List[str], List[List[Optional[float]]]]:
    layers = list(agg.by_layer) + ([None] if agg.has_non_layer else [])
    modules = agg.module_types
    grid = [[None if agg.cell(l, m) is None else agg.cell(l, m).cos for m in modules] for l in layers]
    return [layer_label(l) for l in layers], modules, grid


def colour(value: float, limit: float) -> str:
    """`value` on the symmetric scale [-limit, limit] (clipped), as #rrggbb."""
    position = (max(-1.0, min(1.0, value / limit)) + 1.0) / 2.0 * (len(_STOPS) - 1)
    low = min(int(position), len(_STOPS) - 2)
    share = position - low
    a, b = (tuple(int(s[i:i + 2], 16) for i in (1, 3, 5)) for s in (_STOPS[low], _STOPS[low + 1]))
    return "#" + "".join(f"{round(x + (y - x) * share):02x}" for x, y in zip(a, b))


def _text(x: float, y: float, text: str, size: int = 10, anchor: str = "middle", extra: str = "") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" '
            f'dominant-baseline="central"{extra}>{escape(text)}</text>')


def heatmap_svg(agg: Aggregates) -> Optional[str]:
    """The SVG document, or None when no cell was measured."""
    rows, columns, grid = cosine_grid(agg)
    if not rows or not columns:
        return None
    defined = [abs(v) for line in grid for v in line if v is not None]
    # symmetric scale around 0 sized to the data: cosines near 0 must still show their structure
    limit = max([0.05, *defined])
    width, height = LEFT + CELL_W * len(columns) + 80, TOP + CELL_H * len(rows) + 40
    bar_x = LEFT + CELL_W * len(columns) + 16
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="DejaVu Sans, Arial, sans-serif">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           _text(width / 2, 14, "cos(τ_d, τ_i) per layer and module type", 12),
           _text(width / 2, 30, "(grey: undefined or absent)", 10),
           _text(12, TOP + CELL_H * len(rows) / 2, "layer", 10, extra=f' transform="rotate(-90 12 {TOP + CELL_H * len(rows) / 2:.1f})"')]
    for x, module in enumerate(columns):
        out.append(_text(LEFT + CELL_W * (x + 0.5), TOP - 10, module))
    labelled = len(rows) * len(columns) <= LABELLED_CELLS
    for y, (label, line) in enumerate(zip(rows, grid)):
        top = TOP + CELL_H * y
        out.append(_text(LEFT - 6, top + CELL_H / 2, label, 9, anchor="end"))
        for x, value in enumerate(line):
            left = LEFT + CELL_W * x
            fill = MISSING_COLOUR if value is None else colour(value, limit)
            hover = f"layer {label}, {columns[x]}: " + ("n/a" if value is None else f"{value:+.4f}")
            out.append(f'<rect x="{left}" y="{top}" width="{CELL_W}" height="{CELL_H}" fill="{fill}" '
                       f'stroke="white" stroke-width="0.5"><title>{escape(hover)}</title></rect>')
            if labelled and value is not None:
                dark = abs(value) / limit > 0.6  # white text on the deep colours
                out.append(_text(left + CELL_W / 2, top + CELL_H / 2, f"{value:+.2f}", 8,
                                 extra=' fill="white"' if dark else ""))
    bar_top, bar_height = TOP, CELL_H * len(rows)
    stops = "".join(f'<stop offset="{i / (len(_STOPS) - 1):.2f}" stop-color="{c}"/>' for i, c in enumerate(reversed(_STOPS)))
    out += [f'<defs><linearGradient id="scale" x1="0" y1="0" x2="0" y2="1">{stops}</linearGradient></defs>',
            f'<rect x="{bar_x}" y="{bar_top}" width="{BAR_W}" height="{bar_height}" fill="url(#scale)" stroke="#888"/>']
    for value, y in ((limit, bar_top), (0.0, bar_top + bar_height / 2), (-limit, bar_top + bar_height)):
        out.append(_text(bar_x + BAR_W + 4, y, f"{value:+.2f}", 9, anchor="start"))
    out.append(_text(bar_x + BAR_W / 2, bar_top + bar_height + 14, "cosine", 9))
    out.append("</svg>")
    return "\n".join(out) + "\n"
