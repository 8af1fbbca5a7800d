"""The embedded default: small worlds built on the spot, so every step runs offline on a laptop."""
