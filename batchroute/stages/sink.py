"""The run folder and the sink: shards committed atomically, and the manifest.

Layout of a run (``<output>/<run id>/``)::

    manifest.json        run id, config hash, router version, input fingerprint, counts, paths
    source/              canonical requests (the route stage's input)
    routed/model=NAME/   the plan: routed rows partitioned by target model
    forecast.json        the dry-run forecast
    results/             one row per input row (schemas/results.schema.json)
    rollups/             one row per model (schemas/rollups.schema.json)

Every file is first written under ``_tmp/`` in the run folder and then moved into place, so a
reader of ``results/`` (or any other table folder) never meets a half-written shard: not even
polars, which, unlike pyarrow and DuckDB, does not skip hidden files. On a local disk the move
is an atomic rename; on an object store it is a copy and a delete, which still never exposes a
partial object under the final name. A resumed run deletes whatever ``_tmp/`` still holds.
"""

from __future__ import annotations

import json
import secrets
import urllib.parse
import uuid
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from batchroute.errors import SinkError

TMP = "_tmp"
# Readers hold a whole row group; small ones keep a reader's memory flat with long prompts.
ROW_GROUP_ROWS = 4096


class RunFolder:
    """Paths and atomic writes inside one run's folder, on any pyarrow filesystem (``output``
    is a URI or local path, or a path on ``fs`` when one is given)."""

    # A seam for fault injection, None in real use: called with (temp path, final path) after
    # a table is written and before it is moved into place, e.g. to hold a commit open so that
    # a test can kill the run exactly mid-commit.
    before_commit: ClassVar[Callable[[str, str], None] | None] = None

    def __init__(self, output: str, run_id: str, *, fs: pafs.FileSystem | None = None) -> None:
        if fs is not None:
            self.fs, base = fs, output
        elif "://" in output:
            self.fs, base = pafs.FileSystem.from_uri(output)
        else:
            self.fs, base = pafs.LocalFileSystem(), output
        self.run_id = run_id
        self.path = f"{base.rstrip('/')}/{run_id}"
        self.uri = output.rstrip("/") + "/" + run_id
        # Names this process's shards (part-NNNNNN-WRITER.parquet): two writers can never
        # commit under one name, even if one of them bypassed the run folder's lock.
        self.writer = secrets.token_hex(4)

    @classmethod
    def on(cls, fs: pafs.FileSystem, path: str) -> RunFolder:
        """The run folder at ``path`` on an already opened ``fs``."""
        folder = cls.__new__(cls)
        folder.fs, folder.path = fs, path.rstrip("/")
        folder.run_id = folder.path.rpartition("/")[2]
        folder.uri = folder.path
        folder.writer = secrets.token_hex(4)
        return folder

    def shard_name(self, seq: int) -> str:
        """The name of this writer's ``seq``-th shard in a table folder."""
        return f"part-{seq:06d}-{self.writer}.parquet"

    def sub(self, *parts: str) -> str:
        return "/".join([self.path, *parts])

    def routed_dir(self, model: str) -> str:
        # URI-encoded like pyarrow's hive partitioning, so model names with "/" stay one level.
        return self.sub("routed", "model=" + urllib.parse.quote(model, safe=""))

    def siblings(self) -> list[RunFolder]:
        """The other folders beside this one under the same output, sorted by name: the
        job's earlier runs among them (and other jobs' runs, and folders that are no run)."""
        base = self.path.rpartition("/")[0] or "/"
        if self.fs.get_file_info(base).type != pafs.FileType.Directory:
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(base))
        return [RunFolder.on(self.fs, i.path) for i in sorted(infos, key=lambda i: i.path)
                if i.type == pafs.FileType.Directory and i.path.rstrip("/") != self.path]

    def exists(self) -> bool:
        return bool(self.fs.get_file_info(self.path).type != pafs.FileType.NotFound)

    def write_table(self, directory: str, name: str, table: pa.Table) -> str:
        """Commit ``table`` as ``directory/name``: write a hidden temp file, then rename."""
        self.fs.create_dir(directory, recursive=True)
        final = f"{directory}/{name}"
        tmp = self._tmp(name)
        try:
            pq.write_table(table, tmp, filesystem=self.fs, compression="zstd",
                           row_group_size=ROW_GROUP_ROWS)
            if RunFolder.before_commit is not None:
                RunFolder.before_commit(tmp, final)
            self.fs.move(tmp, final)
        except OSError as exc:
            raise SinkError(f"cannot write {final}: {exc}") from None
        return final

    def write_json(self, name: str, doc: Mapping[str, Any]) -> str:
        return self.write_text(name, json.dumps(doc, indent=2, default=str) + "\n")

    def write_text(self, name: str, text: str) -> str:
        directory, _, base = self.sub(name).rpartition("/")
        return self.write_bytes(directory, base, text.encode())

    def write_bytes(self, directory: str, name: str, data: bytes) -> str:
        """Commit ``data`` as ``directory/name``: write a hidden temp file, then rename."""
        final = f"{directory}/{name}"
        tmp = self._tmp(name)
        try:
            self.fs.create_dir(directory, recursive=True)
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            self.fs.move(tmp, final)
        except OSError as exc:
            raise SinkError(f"cannot write {final}: {exc}") from None
        return final

    def _tmp(self, name: str) -> str:
        self.fs.create_dir(self.sub(TMP), recursive=True)
        return self.sub(TMP, f"{uuid.uuid4().hex[:12]}-{name}")

    def read_text(self, name: str) -> str:
        with self.fs.open_input_stream(self.sub(name)) as f:
            return bytes(f.read()).decode()

    def read_json(self, name: str) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.read_text(name))
        return doc

    def has(self, *parts: str) -> bool:
        return bool(self.fs.get_file_info(self.sub(*parts)).type != pafs.FileType.NotFound)

    def shards(self, directory: str, *, suffix: str = "") -> list[str]:
        """Committed files below ``directory`` whose names end with ``suffix`` (never hidden
        temp files), sorted."""
        if self.fs.get_file_info(directory).type == pafs.FileType.NotFound:
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(directory, recursive=True))
        return sorted(i.path for i in infos if i.type == pafs.FileType.File
                      and not i.base_name.startswith((".", "_"))
                      and i.base_name.endswith(suffix))

    def entries(self) -> set[str]:
        """Names directly inside the run folder (empty when it does not exist)."""
        if not self.exists():
            return set()
        return {i.base_name for i in self.fs.get_file_info(pafs.FileSelector(self.path))}

    def discard_temp_files(self) -> int:
        """Delete the half-written files a killed run left in ``_tmp/``; return how many."""
        if not self.has(TMP):
            return 0
        temps = self.fs.get_file_info(pafs.FileSelector(self.sub(TMP), recursive=True))
        self.fs.delete_dir_contents(self.sub(TMP))
        return sum(1 for i in temps if i.type == pafs.FileType.File)

    def delete(self) -> None:
        """Delete the whole run folder."""
        if self.exists():
            self.fs.delete_dir(self.path)

    def remove(self, *parts: str) -> None:
        path = self.sub(*parts)
        if self.fs.get_file_info(path).type == pafs.FileType.Directory:
            self.fs.delete_dir(path)


class ResultSink:
    """Appends result shards as they complete and keeps the counts of what it wrote.

    Shard names continue after the highest one already in the folder, so a resumed run
    never overwrites a committed shard.
    """

    def __init__(self, folder: RunFolder) -> None:
        self.folder = folder
        self.directory = folder.sub("results")
        self.counts: dict[str, int] = {"ok": 0, "failed": 0, "rejected": 0}
        existing = [p.rsplit("/", 1)[-1] for p in folder.shards(self.directory)]
        self._seq = 1 + max((int(n[5:11]) for n in existing
                             if n.startswith("part-") and n[5:11].isdigit()), default=-1)

    def settle_for_resume(self) -> pa.Array:
        """Prepare a resumed dispatch; return the request_ids already answered ``ok``.

        ``failed`` rows are taken out of their shards (each shard is rewritten under its own
        name, an atomic replace), because those requests are sent again and must end with one
        row. ``ok`` and ``rejected`` rows stay as they are.
        """
        return self._answered(drop_failed=True)

    def answered(self) -> pa.Array:
        """The request_ids committed as ``ok`` (nothing is changed)."""
        return self._answered(drop_failed=False)

    def _answered(self, *, drop_failed: bool) -> pa.Array:
        ok: list[pa.Array] = []
        for path in self.folder.shards(self.directory):
            keys = pq.read_table(path, columns=["request_id", "status"],
                                 filesystem=self.folder.fs)
            status = keys.column("status")
            ok.append(keys.filter(pc.equal(status, "ok")).column("request_id").combine_chunks())
            if drop_failed and pc.any(pc.equal(status, "failed")).as_py():
                table = pq.read_table(path, filesystem=self.folder.fs)
                keep = table.filter(pc.not_equal(table.column("status"), "failed"))
                directory, name = path.rsplit("/", 1)
                if keep.num_rows:
                    self.folder.write_table(directory, name, keep)
                else:
                    self.folder.fs.delete_file(path)
        return pa.concat_arrays(ok) if ok else pa.array([], pa.string())

    def write(self, results: pa.Table) -> None:
        if results.num_rows == 0:
            return
        self.folder.write_table(self.directory, self.folder.shard_name(self._seq), results)
        self._seq += 1
        for status, n in zip(*_value_counts(results.column("status")), strict=True):
            self.counts[status] = self.counts.get(status, 0) + n


def _value_counts(col: pa.ChunkedArray) -> tuple[list[str], list[int]]:
    vc = pc.value_counts(col)
    return vc.field("values").to_pylist(), vc.field("counts").to_pylist()
