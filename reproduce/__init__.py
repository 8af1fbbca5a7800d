"""Reproductions driven by a recipe: pretrain -> merge -> diagnostics -> evaluation -> one report."""
