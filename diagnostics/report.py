"""Write the diagnostics report files into a folder: diagnostics.json, diagnostics.md and diagnostics.svg.

The JSON layout is documented in docs/diagnostics.md ("diagnostics.json"); SCHEMA names its version.
"""

import os
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Dict, List, Optional

from finmerge.diagnostics.aggregate import Aggregates
from finmerge.diagnostics.heatmap import heatmap_svg
from finmerge.diagnostics.render import NA, card_section, cosine_matrix, table, verdict
from finmerge.diagnostics.stats import StatsCollector
from finmerge.safety.outputs import atomic_write_files, json_text

SCHEMA = "finmerge.diagnostics/2"
JSON_NAME, MD_NAME, SVG_NAME = "diagnostics.json", "diagnostics.md", "diagnostics.svg"
TOP_TENSORS = 10


@dataclass
class Report:
    aggregates: Aggregates
    data: Dict[str, Any]  # exactly what diagnostics.json holds
    heatmap: Optional[str]  # file name, or None when not drawn

    @property
    def verdict(self) -> str:
        return self.data["verdict"]

    def card_section(self) -> str:
        return card_section(self.aggregates, self.heatmap)


def _version() -> str:
    try:
        return metadata.version("finmerge")
    except metadata.PackageNotFoundError:
        return "unknown"


def build_data(agg: Aggregates, skipped: Dict[str, str], models: Dict[str, str], source: str,
               weights: Optional[Dict[str, Any]] = None,
               instruct_rows: Optional[List[Dict[str, Any]]] = None) -> Dict[str, Any]:
    return {
        "schema": SCHEMA,
        "finmerge_version": _version(),
        "source": source,
        "models": dict(models),
        "weights": weights,
        "instruct_rows": instruct_rows,
        "verdict": verdict(agg),
        "overall": agg.overall.as_dict(),
        "by_module": [{"module": m, **s.as_dict()} for m, s in agg.by_module.items()],
        "by_layer": [{"layer": l, **s.as_dict()} for l, s in agg.by_layer.items()],
        "cells": [{"layer": l, "module": m, **agg.cells[(l, m)].as_dict()}
                  for l in [*agg.by_layer, None] for m in agg.by_module if (l, m) in agg.cells],
        "tensors": [{"name": t.name, "shape": list(t.shape), "layer": t.layer, "module": t.module, **t.sums.as_dict()}
                    for t in agg.tensors],
        "skipped": [{"name": name, "reason": reason} for name, reason in skipped.items()],
        "heatmap": None,
    }


def markdown(agg: Aggregates, data: Dict[str, Any]) -> str:
    models = data["models"]
    lines = [
        "# Independence diagnostics: domain vs instruction task vector",
        "",
        f"**{data['verdict']}**",
        "",
        f"τ_d = domain − base, τ_i = instruct − base; base `{models.get('base')}`, domain `{models.get('domain')}`, "
        f"instruct `{models.get('instruct')}`. Measured {'during the merge' if data['source'] == 'merge' else 'by finmerge diagnose'}.",
        "",
        "Cosines of groups come from summed statistics (Σ τ_d·τ_i / √(Σ‖τ_d‖²·Σ‖τ_i‖²)), never from averaging "
        "cosines. *random ±* is the spread (1/√n) of the cosine between two random directions with as many "
        f"entries: a cosine within a few of those is indistinguishable from chance. {NA} = undefined "
        "(a zero task vector has no direction; a zero base has no relative size). *same sign*: among the entries "
        "where both vectors are non-zero, the share that agree in sign (50% for independent signs); *both ≠ 0*: "
        "the share of all entries where both are non-zero, which *same sign* is measured on.",
        "",
        "## Overall",
        "",
        *table("", [("all", agg.overall)]),
        "",
        "## By module type",
        "",
        *table("module", list(agg.by_module.items())),
        "",
        "## By layer",
        "",
        *table("layer", [(str(l), s) for l, s in agg.by_layer.items()]),
        "",
        "## Cosine by layer × module type",
        "",
        *cosine_matrix(agg),
        "",
        f"![cosine heatmap]({SVG_NAME})" if data["heatmap"] else "No heatmap: no tensors were measured.",
        "",
    ]
    ranked = sorted((t for t in agg.tensors if t.sums.cos is not None), key=lambda t: -abs(t.sums.cos))
    if ranked:
        lines += [f"## Tensors with the largest |cos| (all {len(agg.tensors)} in {JSON_NAME})", "",
                  *table("tensor", [(f"`{t.name}`", t.sums) for t in ranked[:TOP_TENSORS]]), ""]
    undefined = [t.name for t in agg.tensors if t.sums.cos is None]
    if undefined:
        lines += [f"Cosine undefined (a zero task vector) in {len(undefined)} tensor(s): "
                  + ", ".join(f"`{n}`" for n in undefined[:TOP_TENSORS]) + (" …" if len(undefined) > TOP_TENSORS else ""), ""]
    if data.get("instruct_rows"):
        lines += ["## Rows that took only the instruction vector (`instruct_rows: auto`)", "",
                  ", ".join(f"{r['id']} `{r['token']}`" for r in data["instruct_rows"]), ""]
    if data["skipped"]:
        lines += ["## Not measured", "", *[f"- `{s['name']}`: {s['reason']}" for s in data["skipped"]], ""]
    return "\n".join(lines)


def write_report(folder: str, collector: StatsCollector, models: Dict[str, str], source: str,
                 weights: Optional[Dict[str, Any]] = None,
                 instruct_rows: Optional[List[Dict[str, Any]]] = None) -> Report:
    """Write diagnostics.json, diagnostics.md and diagnostics.svg (the heatmap) into `folder`, each whole or not at all."""
    os.makedirs(folder, exist_ok=True)
    agg = Aggregates(collector.tensors())
    data = build_data(agg, collector.skipped(), models, source, weights, instruct_rows)
    svg = heatmap_svg(agg)
    data["heatmap"] = SVG_NAME if svg is not None else None
    files = {
        # undefined values are null, never NaN; keys in the documented order
        os.path.join(folder, JSON_NAME): json_text(data, indent=1, allow_nan=False, ensure_ascii=False,
                                                   sort_keys=False, default=None),
        os.path.join(folder, MD_NAME): markdown(agg, data)}
    if svg is not None:
        files[os.path.join(folder, SVG_NAME)] = svg
    atomic_write_files(files)
    return Report(agg, data, data["heatmap"])
