"""model: see docs/ARCHITECTURE.md."""
