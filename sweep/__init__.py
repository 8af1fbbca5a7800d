"""Merge over a grid of weights and variants, evaluate each merge, pick the best (`finmerge sweep`)."""

from finmerge.sweep.run import SweepSettings, run_sweep, sweep_markdown, variant_recipe, write_sweep

__all__ = ["SweepSettings", "run_sweep", "sweep_markdown", "variant_recipe", "write_sweep"]
