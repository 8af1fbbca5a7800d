"""The `finmerge` command."""
