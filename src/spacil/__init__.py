"""spacil: SPA (Semantic-guided Patch-level Alignment) for class-incremental learning on a frozen CLIP."""

__version__ = "0.2.0"
