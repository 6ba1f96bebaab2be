"""The one exception type for configurations that cannot work, and its small checks.

It lives in model/, the bottom of the dependency order (launcher -> trainer -> parallel ->
model), so every config section can raise it without importing the launcher.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the offending values."""


def check_positive(name: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"{name} ({value}) must be >= 1")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} ({value!r}) must be one of: {', '.join(choices)}")
