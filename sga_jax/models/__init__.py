"""Model families, one folder each, named like their checkpoints (see docs/ARCHITECTURE.md)."""
