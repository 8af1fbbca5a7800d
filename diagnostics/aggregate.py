"""Group per-tensor sums by layer, by module type, by (layer, module) cell and overall."""

from collections import defaultdict
from typing import Dict, List, Optional, Tuple

from finmerge.diagnostics.names import MODULE_TYPES
from finmerge.diagnostics.stats import Sums, TensorStats


class Aggregates:
    def __init__(self, tensors: List[TensorStats]):
        self.tensors = tensors
        self.overall = Sums.total(t.sums for t in tensors)
        layers: Dict[int, Sums] = defaultdict(Sums)
        modules: Dict[str, Sums] = defaultdict(Sums)
        cells: Dict[Tuple[Optional[int], str], Sums] = defaultdict(Sums)
        for t in tensors:
            if t.layer is not None:
                layers[t.layer] += t.sums
            modules[t.module] += t.sums
            cells[(t.layer, t.module)] += t.sums
        self.by_layer: Dict[int, Sums] = dict(sorted(layers.items()))
        self.by_module: Dict[str, Sums] = {m: modules[m] for m in MODULE_TYPES if m in modules}
        self.cells = cells

    @property
    def module_types(self) -> List[str]:
        return list(self.by_module)

    def cell(self, layer: Optional[int], module: str) -> Optional[Sums]:
        return self.cells.get((layer, module))

    @property
    def has_non_layer(self) -> bool:
        """Embeddings, final norm, lm_head: tensors outside the numbered blocks."""
        return any(layer is None for layer, _ in self.cells)

    def extreme_module(self) -> Optional[Tuple[str, float]]:
        """Module type with the largest |cos| (None if every cosine is undefined)."""
        defined = [(m, s.cos) for m, s in self.by_module.items() if s.cos is not None]
        return max(defined, key=lambda item: abs(item[1])) if defined else None
