"""spacil: SPA (Semantic-guided Patch-level Alignment) for class-incremental learning on a frozen CLIP."""

# The one place the version lives: pyproject.toml reads it (dynamic), `spacil --version` prints it, every store's
# meta.json and every run's summary.json record it as "spacil_version". Bumped with CHANGELOG.md's top section.
__version__ = "0.4.0"
