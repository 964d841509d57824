"""Synthetic and small public datasets written as loader shards."""

from loader.datasets.mnist1d import make_shards

__all__ = ["make_shards"]
