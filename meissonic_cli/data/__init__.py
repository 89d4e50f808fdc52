"""data: see docs/ARCHITECTURE.md."""
