"""Tables keyed by op, ``(domain, op_type)``, that refuse a second entry for the same op:
which rule or definition serves an op must never depend on import order."""

from __future__ import annotations

from typing import Any, MutableMapping


def op_label(key: tuple[str, str]) -> str:
    """``"graphc.LayerNormGrad"``, or ``"MatMul"`` for the standard domain."""
    return f"{key[0]}.{key[1]}" if key[0] else key[1]


def add_unique(table: MutableMapping[tuple[str, str], Any], key: tuple[str, str], value: Any, what: str) -> None:
    """``table[key] = value``; ValueError naming ``what`` and the op when ``key`` is taken."""
    if key in table:
        old = table[key]
        by = f" ({old.__module__}.{old.__qualname__})" if hasattr(old, "__qualname__") else ""
        raise ValueError(f"{what} for {op_label(key)} is already registered{by}")
    table[key] = value
