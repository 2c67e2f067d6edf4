"""Public names shown as ``mcast_trio.X``, as trio does."""

from __future__ import annotations

__all__ = ["fixup_module_metadata"]


def fixup_module_metadata(namespace: dict, public: list[str], module: str) -> None:
    # Show public names as mcast_trio.X (in reprs, docs and pickles), as trio does.
    for name in public:
        obj = namespace[name]
        if isinstance(obj, type) or callable(obj):
            if getattr(obj, "__module__", "").startswith(module + "._"):
                try:
                    obj.__module__ = module
                except (AttributeError, TypeError):  # pragma: no cover
                    pass
