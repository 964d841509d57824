"""Decoders for WebDataset members, chosen by the member's last extension."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

import numpy as np

from loader.errors import ShardError
from loader.sources.images import EXTENSIONS as IMAGE_EXTENSIONS
from loader.sources.images import decode_image


def _npy(data: bytes) -> np.ndarray:
    # allow_pickle=False: a shard is untrusted input and pickle would execute code.
    value = np.load(io.BytesIO(data), allow_pickle=False)
    if not isinstance(value, np.ndarray):
        # np.load quietly accepts .npz archives, which hold several arrays, not one value.
        raise ValueError(f"expected a single .npy array, got {type(value).__name__}")
    return value


def _cls(data: bytes) -> int:
    return int(data.decode("ascii").strip())


def _json(data: bytes) -> Any:
    return json.loads(data)


def _txt(data: bytes) -> str:
    return data.decode("utf-8")


DECODERS: dict[str, Callable[[bytes], Any]] = {
    "npy": _npy,
    "cls": _cls,
    "json": _json,
    "txt": _txt,
    **{ext: decode_image for ext in IMAGE_EXTENSIONS},
}
# Members whose decoded values are arrays, stacked into one tensor column per shard.
ARRAY_EXTENSIONS = frozenset({"npy", *IMAGE_EXTENSIONS})


def decode(ext: str, data: bytes, *, uri: str, member: str) -> Any:
    """Decode one member; an extension without a decoder keeps its raw bytes."""
    decoder = DECODERS.get(ext.lower())
    if decoder is None:
        return bytes(data)
    try:
        return decoder(data)
    except (ValueError, EOFError, OSError) as exc:
        raise ShardError(uri, f"member {member!r}: cannot decode as .{ext}: {exc}") from exc
    except Exception as exc:
        # Parsers of untrusted bytes raise more than ValueError (numpy's .npy header parser lets
        # tokenize.TokenError out); any of them means this member, not the service, is broken.
        raise ShardError(uri, f"member {member!r}: cannot decode as .{ext}: {type(exc).__name__}: {exc}") from exc
