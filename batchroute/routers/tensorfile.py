"""Safetensors files: the MiniLM weights, the static word table, a similarity bank's index.

The format: an 8-byte little-endian header length, a JSON header mapping each tensor's name to
its dtype, shape and [begin, end) byte offsets into the data that follows, and an optional
``__metadata__`` of strings. Tensors are read memory-mapped and read-only, so processes on one
machine that open the same file share its pages.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from batchroute.errors import RouterError

DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
          "I16": np.int16}
_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


def read(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of the file as a numpy array (memory-mapped, read-only). Raises
    RouterError for a dtype this reader does not know or a tensor outside the file, OSError
    when it cannot be read, ValueError when its header is not JSON."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out: dict[str, np.ndarray] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry["dtype"] not in DTYPES:
            raise RouterError(f"{path}: tensor {name} has unsupported dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        if not 0 <= begin <= end <= len(data):
            raise RouterError(f"{path}: tensor {name} lies outside the file (truncated?)")
        out[name] = data[begin:end].view(DTYPES[entry["dtype"]]).reshape(entry["shape"])
    return out


def read_metadata(path: str | Path) -> dict[str, str]:
    """The file's ``__metadata__`` (empty when it has none)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        meta: dict[str, str] = json.loads(f.read(n)).get("__metadata__", {})
    return meta


def write(path: str | Path, tensors: Mapping[str, np.ndarray],
          metadata: Mapping[str, str]) -> None:
    """Write ``tensors`` and ``metadata`` to ``path`` atomically (a temporary file beside it,
    then a rename), so that a reader sees the old file or the whole new one."""
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    arrays = []
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        header[name] = {"dtype": _NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # writers never share one
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for arr in arrays:
            f.write(arr.data)
    tmp.replace(path)
