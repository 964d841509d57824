"""Import paths 'module:attribute' (the attribute may be dotted: 'module:Class.build').

`split_import_path` checks only the form, for parsers that must not run the user's code;
`resolve_import_path` imports, with `pkgutil.resolve_name`, and explains a failure naming the
setting it came from.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import re
import sys

from loader.errors import ConfigError

__all__ = ["resolve_import_path", "split_import_path"]

# pkgutil.resolve_name's own grammar (identifiers, no leading digit), with the colon required: its
# colon-less form imports prefix after prefix, which would import modules the user never named.
_NAME = r"(?!\d)\w+(?:\.(?!\d)\w+)*"
_IMPORT_PATH = re.compile(rf"({_NAME}):({_NAME})")


def split_import_path(path: object) -> tuple[str, str]:
    """(module, attribute) of 'module:attribute', surrounding spaces ignored; a ValueError
    (which pydantic validators may raise as it is) when the form is wrong."""
    match = _IMPORT_PATH.fullmatch(path.strip()) if isinstance(path, str) else None
    if match is None:
        raise ValueError(f"expected 'module:function', got {path!r}")
    return match.group(1), match.group(2)


def resolve_import_path(path: str, key: str) -> object:
    """The object `path` names; a ConfigError under `key` says which part could not be found."""
    try:
        module, attribute = split_import_path(path)
    except ValueError as exc:
        raise ConfigError(key, str(exc)) from None
    _cwd_importable()
    # A module written after this process looked at its directory would otherwise stay invisible.
    importlib.invalidate_caches()
    try:
        return pkgutil.resolve_name(f"{module}:{attribute}")
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if module == missing or module.startswith(missing + "."):
            raise ConfigError(
                key, f"cannot import module {module!r} (searched the working directory and PYTHONPATH): {exc}"
            ) from exc
        # The module exists but one of its own imports does not: say so, not "not found".
        raise ConfigError(key, f"importing module {module!r} failed: {exc}") from exc
    except AttributeError as exc:
        # A failed import leaves no module behind; one that is there was imported and lacks a part.
        if module not in sys.modules:
            raise ConfigError(key, f"importing module {module!r} failed: AttributeError: {exc}") from exc
        raise ConfigError(key, _missing_attribute(sys.modules[module], module, attribute, exc)) from None
    except Exception as exc:
        raise ConfigError(key, f"importing module {module!r} failed: {type(exc).__name__}: {exc}") from exc


def _missing_attribute(target: object, module: str, attribute: str, exc: AttributeError) -> str:
    owner, walked = f"module {module!r}", []
    for part in attribute.split("."):
        if not hasattr(target, part):
            return f"{owner} has no attribute {part!r}"
        target = getattr(target, part)
        walked.append(part)
        owner = f"{type(target).__name__} '{module}:{'.'.join(walked)}'"
    return str(exc)  # every part is there now: an attribute that comes and goes, say it as it came


def _cwd_importable() -> None:
    # `loader serve` is a console script (sys.path[0] is the venv's bin, not the cwd), and a Ray
    # worker's sys.path is Ray's own, so a model defined in the project folder the user started
    # the service from would not import. Appending (not prepending) keeps that folder from
    # shadowing installed packages and the standard library.
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)
