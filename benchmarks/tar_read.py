"""How fast a WebDataset tar shard becomes one Arrow table: this project's reader against the
`webdataset` package's own iterator pipeline (`tar_file_iterator` + `group_by_keys`) feeding the
same decoders and the same columnar stacking.

    python benchmarks/tar_read.py [--repeats 5] [--json benchmarks/results/tar_read.json]

Shards are written once into a temporary folder and read warm (from the page cache), so the
figure is the decoding path, not the disk. Three kinds of sample: small (40 float32 + label),
large (a 3x224x224 uint8 .npy + label, 150 KB) and PNG images (32x32 RGB + label).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np
import pyarrow as pa
import webdataset as wds
from webdataset import tariterators

from loader.sources import read_tar
from loader.sources.decoders import decode
from loader.tensors import to_arrow

KINDS = {
    # name: (samples per shard, sample factory)
    "small": (4096, lambda rng: {"x.npy": rng.normal(size=40).astype(np.float32)}),
    "large": (64, lambda rng: {"x.npy": rng.integers(0, 256, size=(3, 224, 224), dtype=np.uint8)}),
    "png": (1024, lambda rng: {"png": rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)}),
}


def write_shard(path: str, kind: str) -> int:
    count, make = KINDS[kind]
    rng = np.random.default_rng(0)
    with wds.TarWriter(path, mtime=0) as writer:
        for i in range(count):
            writer.write({"__key__": f"{i:09d}", "cls": int(i % 10), **make(rng)})
    return os.path.getsize(path)


def read_with_package(path: str) -> pa.Table:
    """The package's path end to end: its tar iterator and grouping, our decoders and stacking."""
    columns: dict[str, list] = {}
    with open(path, "rb") as stream:
        files = ({**member, "__url__": path} for member in tariterators.tar_file_iterator(stream))
        for sample in tariterators.group_by_keys(files, lcase=False):
            for suffix, data in sample.items():
                if suffix.startswith("__"):
                    continue
                ext = suffix.rpartition(".")[2]
                columns.setdefault(suffix, []).append(decode(ext, data, uri=path, member=suffix))
    arrays = {}
    for suffix, values in columns.items():
        if isinstance(values[0], np.ndarray):
            arrays[suffix] = to_arrow(np.stack(values))
        else:
            arrays[suffix] = pa.array(values)
    return pa.table(arrays)


READERS = {"loader": read_tar, "webdataset_iterator": read_with_package}


def timed(reader, path: str, repeats: int) -> list[float]:
    reader(path)  # warm the page cache and imports
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        table = reader(path)
        times.append(time.perf_counter() - start)
        assert table.num_rows > 0
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for kind, (count, _) in KINDS.items():
            path = os.path.join(folder, f"{kind}.tar")
            size = write_shard(path, kind)
            for name, reader in READERS.items():
                times = timed(reader, path, args.repeats)
                best = min(times)
                rows.append({
                    "path": name, "sample": kind, "samples": count,
                    "samples_per_s": round(count / best), "mb_per_s": round(size / best / 1e6, 1),
                    "median_s": round(statistics.median(times), 4),
                })  # fmt: skip
                print(f"{kind:6s} {name:20s} {rows[-1]['samples_per_s']:>9,} samples/s "
                      f"{rows[-1]['mb_per_s']:>8} MB/s (best of {args.repeats})")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
