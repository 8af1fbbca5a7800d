"""Continual pretraining of the base on domain text (filled by the pretrain issue)."""
