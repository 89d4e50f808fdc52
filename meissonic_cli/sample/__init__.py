"""sample: see docs/ARCHITECTURE.md."""
