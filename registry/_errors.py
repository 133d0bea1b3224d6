"""The registry's exception types. Every error the registry raises is a RegistryError."""

from __future__ import annotations

from registry._records import PluginRecord


class RegistryError(Exception):
    """Base class of every error raised by the plugin registry."""


class ManifestError(RegistryError):
    """A manifest (or a plugin project's ``pyproject.toml``) is unreadable or invalid.

    ``path`` is the file; ``problems`` holds one line per problem, in the formats
    ``path:line:col: message`` (TOML syntax) or ``path: plugin[i].field: message``
    (schema).
    """

    def __init__(self, path: str, problems: list[str]) -> None:
        self.path = str(path)
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class PluginLoadError(RegistryError):
    """A plugin could not be discovered, imported or called and strict mode is on
    (``ENGINE_STRICT_PLUGINS=1`` / ``--strict-plugins``).

    ``plugin`` is the offending PluginRecord when one is known, else None.
    """

    def __init__(self, message: str, plugin: PluginRecord | None = None) -> None:
        self.plugin = plugin
        super().__init__(message)
