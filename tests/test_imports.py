"""loader.imports: the one parser and resolver of 'module:attribute' settings."""

from __future__ import annotations

import sys

import pytest

from loader.errors import ConfigError
from loader.imports import resolve_import_path, split_import_path


@pytest.fixture
def project_dir(tmp_path, monkeypatch):
    """tmp_path as the working directory, with sys.path and the test's modules put back."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        if name.startswith("imp_"):
            del sys.modules[name]


@pytest.mark.parametrize(
    ("path", "parts"),
    [(" loader.models:mlp ", ("loader.models", "mlp")), ("a.b:C.build", ("a.b", "C.build")), ("é:f", ("é", "f"))],
)
def test_split_accepts_dotted_names_on_both_sides(path, parts) -> None:
    assert split_import_path(path) == parts


@pytest.mark.parametrize("path", ["loader.models", ":mlp", "m:", "a:b:c", "1m:f", "m:f-g", "m :f", "", None, 3])
def test_split_refuses_anything_else(path) -> None:
    with pytest.raises(ValueError, match="expected 'module:function'"):
        split_import_path(path)


def test_resolve_names_the_key_and_finds_nested_attributes() -> None:
    from loader.models import mlp

    assert resolve_import_path("loader.models:mlp", key="options.learner") is mlp
    with pytest.raises(ConfigError) as caught:
        resolve_import_path("loader.models.mlp", key="options.learner")
    assert str(caught.value) == "options.learner: expected 'module:function', got 'loader.models.mlp'"
    with pytest.raises(ConfigError) as caught:
        resolve_import_path("loader.imports:ConfigError.nope", key="k")
    assert str(caught.value) == "k: type 'loader.imports:ConfigError' has no attribute 'nope'"


def test_an_attribute_error_while_importing_is_an_import_failure(project_dir) -> None:
    (project_dir / "imp_broken.py").write_text("import os\nos.no_such_thing\n")
    with pytest.raises(ConfigError) as caught:
        resolve_import_path("imp_broken:build", key="reference.factory")
    assert caught.value.key == "reference.factory"
    assert caught.value.problem.startswith("importing module 'imp_broken' failed: AttributeError:")

