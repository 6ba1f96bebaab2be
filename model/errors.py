"""The exception types for input that cannot work (a config, the data), and small checks.

They live in model/, the bottom of the dependency order (launcher -> trainer -> checkpoint ->
parallel -> model), so every config section and the data loaders can raise them without
importing the launcher. Both are refused before any collective, on every rank alike; they
have their own exit codes (launcher/exit_codes.py).
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the offending values."""


class DataError(ConfigError):
    """Training data that cannot be used: unreadable, too small for the layout, token ids
    outside the vocabulary, or changed since the checkpoint a run resumes."""


def check_positive(name: str, value: int) -> None:
    if value < 1:
        raise ConfigError(f"{name} ({value}) must be >= 1")


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} ({value!r}) must be one of: {', '.join(choices)}")
