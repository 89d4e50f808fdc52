"""train: see docs/ARCHITECTURE.md."""
