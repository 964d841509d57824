"""Regenerates the protobuf and gRPC modules under loader/v1 from protos/loader/v1/*.proto.

Run `python protos/generate.py` after editing a .proto file; tests/test_protos.py runs it into a
temporary folder and fails if the committed modules differ.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from grpc_tools import protoc

PROTO_ROOT = pathlib.Path(__file__).resolve().parent
REPO_ROOT = PROTO_ROOT.parent


def generate(out_dir: pathlib.Path) -> list[pathlib.Path]:
    protos = sorted(PROTO_ROOT.glob("loader/v1/*.proto"))
    out_dir.mkdir(parents=True, exist_ok=True)
    include = pathlib.Path(protoc.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(str(p.relative_to(PROTO_ROOT)) for p in protos),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed: " + " ".join(args))
    return sorted((out_dir / "loader" / "v1").glob("*_pb2*.py*"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=pathlib.Path, default=REPO_ROOT)
    written = generate(parser.parse_args().out)
    print("\n".join(str(p) for p in written), file=sys.stderr)


if __name__ == "__main__":
    main()
