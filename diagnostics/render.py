"""Human-readable forms of the aggregates: the verdict line, markdown tables, the model-card section."""

from typing import List, Optional

from finmerge.diagnostics.aggregate import Aggregates
from finmerge.diagnostics.stats import Sums

NA = "n/a"  # an undefined value (cosine with a zero vector, size relative to a zero base)
COLUMNS = "| {key} | tensors | entries | cos(τ_d, τ_i) | random ± | ‖τ_d‖ | ‖τ_i‖ | ‖τ_d‖/‖θ‖ | ‖τ_i‖/‖θ‖ | same sign | both ≠ 0 |"


def fmt(value: Optional[float], spec: str) -> str:
    return NA if value is None else format(value, spec)


def _strength(cos: float) -> str:
    size = abs(cos)
    if size < 0.05:
        return "nearly orthogonal"
    word = "aligned" if cos > 0 else "opposed"
    return f"{'weakly' if size < 0.2 else 'partly' if size < 0.5 else 'strongly'} {word}"


def verdict(agg: Aggregates) -> str:
    """One line: how independent the two task vectors are and where they are least so."""
    total = agg.overall
    if not total.n:
        return "No tensors were measured."
    if total.cos is None:
        zero = [name for name, sq in (("domain", total.sq_domain), ("instruct", total.sq_instruct)) if sq == 0.0]
        return (f"Undefined: the {' and '.join(zero)} task vector is zero ({' and '.join(zero)} model = base), "
                "so there is no angle to measure.")
    chance = abs(total.cos) < 3 * total.random_cos_std
    text = (f"{_strength(total.cos).capitalize()}: overall cos(τ_d, τ_i) = {total.cos:+.4f} "
            f"({'within' if chance else 'outside'} the ±{total.random_cos_std:.1e} spread of random directions)")
    extreme = agg.extreme_module()
    if extreme and len(agg.by_module) > 1:
        text += f"; largest |cos| by module type: {extreme[0]} {extreme[1]:+.4f}"
    if total.sq_instruct > 0:
        text += f"; ‖τ_d‖/‖τ_i‖ = {total.norm_domain / total.norm_instruct:.3g}"
    return text + "."


def _percent(share: Optional[float]) -> str:
    return NA if share is None else f"{100 * share:.1f}%"


def row(key: str, s: Sums) -> str:
    cells = [
        key, str(s.tensors), f"{s.n:,}", fmt(s.cos, "+.4f"), fmt(s.random_cos_std, ".1e"),
        f"{s.norm_domain:.4g}", f"{s.norm_instruct:.4g}", fmt(s.relative(s.sq_domain), ".3g"),
        fmt(s.relative(s.sq_instruct), ".3g"), _percent(s.sign_agree), _percent(s.nonzero_share),
    ]
    return "| " + " | ".join(cells) + " |"


def table(key: str, rows: List[tuple]) -> List[str]:
    header = COLUMNS.format(key=key)
    return [header, "|" + "---|" * (header.count("|") - 1), *[row(k, s) for k, s in rows]]


def layer_label(layer: Optional[int]) -> str:
    return "outside blocks" if layer is None else str(layer)


def cosine_matrix(agg: Aggregates) -> List[str]:
    """The heatmap as a text table: layers down, module types across, cosine in each cell."""
    modules = agg.module_types
    lines = ["| layer | " + " | ".join(modules) + " |", "|---|" + "---|" * len(modules)]
    layers: List[Optional[int]] = list(agg.by_layer) + ([None] if agg.has_non_layer else [])
    for layer in layers:
        cells = []
        for module in modules:
            s = agg.cell(layer, module)
            cells.append("" if s is None else fmt(s.cos, "+.3f"))
        lines.append(f"| {layer_label(layer)} | " + " | ".join(cells) + " |")
    return lines


def card_section(agg: Aggregates, heatmap: Optional[str]) -> str:
    """Compact summary for the merged model's README (the full report is in diagnostics.md)."""
    lines = [
        "### Independence of the task vectors",
        "",
        f"τ_d = domain − base, τ_i = instruct − base. {verdict(agg)}",
        "",
        "| module type | cos(τ_d, τ_i) | ‖τ_d‖/‖θ‖ | ‖τ_i‖/‖θ‖ |",
        "|---|---|---|---|",
        *[f"| {m} | {fmt(s.cos, '+.4f')} | {fmt(s.relative(s.sq_domain), '.3g')} | {fmt(s.relative(s.sq_instruct), '.3g')} |"
          for m, s in [*agg.by_module.items(), ("all", agg.overall)]],
        "",
        "Full report: `diagnostics.md` and `diagnostics.json`" + (f", heatmap `{heatmap}`." if heatmap else "."),
    ]
    return "\n".join(lines)
