"""The error every layer raises for a config value that cannot work (a leaf module: no imports)."""

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A config value that cannot work; the message names key, value and what is allowed."""
