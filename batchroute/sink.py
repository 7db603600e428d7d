"""The run folder and the sink: shards committed atomically, and the manifest.

Layout of a run (``<output>/<run id>/``)::

    manifest.json        run id, config hash, router version, input fingerprint, counts, paths
    source/              canonical requests (the route stage's input)
    routed/model=NAME/   the plan: routed rows partitioned by target model
    forecast.json        the dry-run forecast
    results/             one row per input row (schemas/results.schema.json)
    rollups/             one row per model (schemas/rollups.schema.json)

Every Parquet file is written under a hidden temporary name and then moved into place, so a
reader (pyarrow, polars, DuckDB and Spark all skip names starting with "." or "_") never sees a
half-written shard. On a local disk the move is an atomic rename; on an object store it is a
copy and a delete, which still never exposes a partial object under the final name.
"""

from __future__ import annotations

import json
import urllib.parse
import uuid
from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from batchroute.errors import SinkError


class RunFolder:
    """Paths and atomic writes inside one run's folder, on any pyarrow filesystem."""

    def __init__(self, output: str, run_id: str) -> None:
        if "://" in output:
            self.fs, base = pafs.FileSystem.from_uri(output)
        else:
            self.fs, base = pafs.LocalFileSystem(), output
        self.run_id = run_id
        self.path = f"{base.rstrip('/')}/{run_id}"
        self.uri = output.rstrip("/") + "/" + run_id

    def sub(self, *parts: str) -> str:
        return "/".join([self.path, *parts])

    def routed_dir(self, model: str) -> str:
        # URI-encoded like pyarrow's hive partitioning, so model names with "/" stay one level.
        return self.sub("routed", "model=" + urllib.parse.quote(model, safe=""))

    def exists(self) -> bool:
        return bool(self.fs.get_file_info(self.path).type != pafs.FileType.NotFound)

    def write_table(self, directory: str, name: str, table: pa.Table) -> str:
        """Commit ``table`` as ``directory/name``: write a hidden temp file, then rename."""
        self.fs.create_dir(directory, recursive=True)
        final = f"{directory}/{name}"
        tmp = f"{directory}/.{name}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            pq.write_table(table, tmp, filesystem=self.fs, compression="zstd")
            self.fs.move(tmp, final)
        except OSError as exc:
            raise SinkError(f"cannot write {final}: {exc}") from None
        return final

    def write_json(self, name: str, doc: Mapping[str, Any]) -> str:
        self.fs.create_dir(self.path, recursive=True)
        final = self.sub(name)
        tmp = self.sub(f".{name}.tmp")
        try:
            with self.fs.open_output_stream(tmp) as f:
                f.write((json.dumps(doc, indent=2, default=str) + "\n").encode())
            self.fs.move(tmp, final)
        except OSError as exc:
            raise SinkError(f"cannot write {final}: {exc}") from None
        return final


class ResultSink:
    """Appends result shards as they complete and keeps the counts by status."""

    def __init__(self, folder: RunFolder) -> None:
        self.folder = folder
        self.directory = folder.sub("results")
        self.counts: dict[str, int] = {"ok": 0, "failed": 0, "rejected": 0}
        self._seq = 0

    def write(self, results: pa.Table) -> None:
        if results.num_rows == 0:
            return
        self.folder.write_table(self.directory, f"part-{self._seq:06d}.parquet", results)
        self._seq += 1
        for status, n in zip(*_value_counts(results.column("status")), strict=True):
            self.counts[status] = self.counts.get(status, 0) + n


def _value_counts(col: pa.ChunkedArray) -> tuple[list[str], list[int]]:
    vc = pc.value_counts(col)
    return vc.field("values").to_pylist(), vc.field("counts").to_pylist()
