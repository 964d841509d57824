"""A trainer installs only the client (`pip install loader`): the base package's dependencies
hold none of the service's, `from loader import RemoteLoader` and the client verbs work without
them, and `loader serve` says which extra to install. The service's modules are made missing in a
child interpreter, as in an environment that never installed them."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER_ONLY = ("ray", "scikit-learn", "mnist1d", "pydantic", "pyyaml", "grpcio-health-checking", "grpcio-reflection")

WITHOUT_SERVER = textwrap.dedent("""
    import importlib.abc, sys
    from loader.cli import SERVER_MODULES

    class Missing(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in SERVER_MODULES:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    sys.meta_path.insert(0, Missing())
    for name in [m for m in sys.modules if m.split(".")[0] in SERVER_MODULES]:
        del sys.modules[name]
""")


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_SERVER + textwrap.dedent(code)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_the_base_package_depends_on_no_server_package():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as handle:
        project = tomllib.load(handle)["project"]
    base = " ".join(project["dependencies"]).lower()
    assert not [name for name in SERVER_ONLY if name in base], project["dependencies"]
    server = " ".join(project["optional-dependencies"]["server"]).lower()
    assert all(name in server for name in SERVER_ONLY)


def test_the_client_imports_and_runs_without_the_server_packages():
    done = run("""
        from loader import RemoteLoader, ServiceUnreachable
        from loader.client.admin import fetch_stats
        from loader.cli import main
        loaded = sorted({m.split(".")[0] for m in sys.modules} & SERVER_MODULES)
        assert not loaded, loaded
        # A client verb runs (and fails on the unreachable address, not on an import).
        print("stats rc", main(["stats", "--address", "127.0.0.1:1"]))
    """)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "stats rc 1" in done.stdout
    assert "UNAVAILABLE" in done.stderr


def test_serve_without_the_server_extra_names_it():
    done = run("""
        from loader.cli import main
        sys.exit(main(["serve", "--shards", "data/*.tar"]))
    """)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "pip install 'loader[server]'" in done.stderr
    assert "Traceback" not in done.stderr
