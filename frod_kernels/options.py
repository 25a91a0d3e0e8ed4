"""The one check of an enumerated option (mode, backend, path, …): a clear error naming the choices."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["check_choice"]


def check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise ValueError naming them."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value
