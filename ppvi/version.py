"""ppvi's version (one place: the package, config.json and pyproject read it)."""

__version__ = "0.1.0"
