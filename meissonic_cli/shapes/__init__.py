"""shapes: see docs/ARCHITECTURE.md."""
