"""Evaluation of checkpoints: held-out domain perplexity and chat-format QA (generation and likelihood)."""
