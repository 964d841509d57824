"""The committed protobuf modules are what protos/ generates today."""

from __future__ import annotations

import filecmp
import pathlib
import runpy

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_generated_modules_are_fresh(tmp_path):
    generate = runpy.run_path(str(REPO / "protos" / "generate.py"))["generate"]
    written = generate(tmp_path)
    assert {p.name for p in written} == {"loader_pb2.py", "loader_pb2.pyi", "loader_pb2_grpc.py"}
    stale = [p.name for p in written if not filecmp.cmp(p, REPO / "loader" / "v1" / p.name, shallow=False)]
    assert not stale, f"regenerate with `python protos/generate.py`: {stale} differ from protos/"
