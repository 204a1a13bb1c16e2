"""broadcaster.__all__ lists exactly the package's public names, sorted."""

from __future__ import annotations

import importlib
import types

import broadcaster


def test_all_is_sorted() -> None:
    """broadcaster.__all__ is in sorted order."""
    assert broadcaster.__all__ == sorted(broadcaster.__all__)


def test_all_has_no_duplicates() -> None:
    """broadcaster.__all__ names each member once."""
    assert len(set(broadcaster.__all__)) == len(broadcaster.__all__)


def test_every_exported_name_is_importable() -> None:
    """Every name in broadcaster.__all__ can be imported from the package."""
    module = importlib.import_module("broadcaster")
    for name in module.__all__:
        # ``from broadcaster import name`` looks the name up on the module just like this.
        member = getattr(module, name)
        assert getattr(member, "__module__", "").startswith("broadcaster."), name


def test_every_public_name_is_exported() -> None:
    """Every public, non-module name the package defines is listed in broadcaster.__all__."""
    public = {
        name
        for name, value in vars(broadcaster).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType)
    }
    assert public == set(broadcaster.__all__)
