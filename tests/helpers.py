"""Builders shared by every tier: a tiny real router and job documents."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import selectors
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from batchroute.config import MMLU_LABELS
from batchroute.routers import classifier as rt

REPO = Path(__file__).resolve().parent.parent
MMLU = Path(MMLU_LABELS)
CHEAP, MID, STRONG = "cheap-model", "mid-model", "strong-model"
T = TypeVar("T")


def routed_rows(n: int, *, prefix: str = "t", text: str = "question") -> Any:
    """``n`` rows as the plan hands them to dispatch (schemas.ROUTED): ids ``PREFIXi``,
    prompts ``TEXT i``, 8 input and 32 output tokens estimated."""
    import pyarrow as pa

    from batchroute import schemas

    cols: dict[str, Any] = {name: [None] * n for name in schemas.ROUTED.names}
    cols.update(request_id=[f"{prefix}{i}" for i in range(n)], row=list(range(n)),
                prompt=[f"{text} {i}" for i in range(n)],
                est_input_tokens=[8] * n, est_output_tokens=[32] * n)
    return pa.table(cols, schema=schemas.ROUTED)


def tiny_router(thresholds: dict[str, float] | None = None, *,
                policy: str = "relative") -> bytes:
    """A real ONNX router with hand-set weights: the word "easy" makes the cheap model likely
    to succeed, "hard" makes it unlikely; the strong model is always likely. Its thresholds
    are recorded as set for ``policy`` (the default policy's, as `batchroute train` does)."""
    vocab = ["easy", "hard"]
    w = np.array([[4.0, 0.0], [-4.0, 0.0], [0.0, 0.0]], np.float32)  # easy, hard, unknown
    meta = {"version": "tiny-1", "policy": policy,
            "thresholds": json.dumps(thresholds or {CHEAP: 0.5, STRONG: 0.0})}
    return rt.build_graph(vocab, w, np.zeros(2, np.float32), np.array([0.0, 2.0], np.float32),
                          [CHEAP, STRONG], meta)


def model_table(name: str, price_in: float, price_out: float, *, base_url: str,
                provider: str = "openai", **extra: Any) -> dict[str, Any]:
    return {"provider": provider, "base_url": base_url, "api_key_env": "BATCHROUTE_TEST_KEY",
            "input_usd_per_mtok": price_in, "output_usd_per_mtok": price_out,
            "rpm": 60_000, "tpm": 50_000_000, "concurrency": 32, "context_window": 8192,
            "timeout_s": 5.0, **extra}


def job_doc(base_url: str = "http://127.0.0.1:1/v1", *, router_path: str = "",
            input_uri: str = "in.parquet", output: str = "out") -> dict[str, Any]:
    anthropic_url = base_url.removesuffix("/v1")
    doc: dict[str, Any] = {
        "job": {"name": "t", "input": input_uri, "output": output,
                "reference_model": STRONG},
        "router": {"rules": [{"name": "code", "contains_code": True, "model": MID}],
                   "batch_size": 256},
        "dispatch": {"max_attempts": 3, "backoff_base_s": 0.01, "backoff_max_s": 0.05,
                     "default_max_tokens": 64, "batch_rows": 64},
        "models": {
            CHEAP: model_table(CHEAP, 0.25, 1.25, base_url=base_url),
            MID: model_table(MID, 3.0, 15.0, base_url=anthropic_url, provider="anthropic"),
            STRONG: model_table(STRONG, 15.0, 75.0, base_url=base_url),
        },
    }
    if router_path:
        doc["router"]["path"] = router_path
    return doc


def to_toml(doc: dict[str, Any]) -> str:
    """Enough TOML for job documents: nested tables, arrays of tables, scalars."""
    import json

    lines: list[str] = []

    def scalar(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{json.dumps(k)} = {scalar(x)}" for k, x in v.items()) + " }"
        return json.dumps(v)

    def table(prefix: str, t: dict[str, Any]) -> None:
        subs = {k: v for k, v in t.items() if isinstance(v, dict) and k != "thresholds"}
        arrays = {k: v for k, v in t.items() if isinstance(v, list) and v
                  and isinstance(v[0], dict)}
        lines.append(f"[{prefix}]")
        for k, v in t.items():
            if k not in subs and k not in arrays:
                lines.append(f"{json.dumps(k)} = {scalar(v)}")
        for k, items in arrays.items():
            for item in items:
                lines.append(f"[[{prefix}.{json.dumps(k)}]]")
                lines.extend(f"{json.dumps(a)} = {scalar(b)}" for a, b in item.items())
        for k, v in subs.items():
            table(f"{prefix}.{json.dumps(k)}", v)

    for key, value in doc.items():
        table(json.dumps(key), value)
    return "\n".join(lines) + "\n"


def demo_job_doc(input_uri: Path | str, output: Path | str, urls: str | dict[str, str], *,
                 dispatch: dict[str, Any] | None = None, quality: dict[str, Any] | None = None,
                 **model: Any) -> dict[str, Any]:
    """jobs/demo.toml pointed at mock providers on loopback: every model (or each model, given
    a name -> URL map) at its provider, the tests' key variable, limits high enough not to
    bind unless ``model`` overrides them. Its [quality] section is replaced by ``quality``
    (none by default: shadow checks add calls a test would have to count)."""
    import tomllib

    doc: dict[str, Any] = tomllib.loads((REPO / "jobs" / "demo.toml").read_text())
    doc.pop("quality", None)
    if quality is not None:
        doc["quality"] = quality
    doc["job"].update(input=str(input_uri), output=str(output))
    doc["dispatch"].update(dispatch or {})
    for name, m in doc["models"].items():
        url = urls if isinstance(urls, str) else urls[name]
        m["base_url"] = url + ("/v1" if m["provider"] == "openai" else "")
        m.update({"api_key_env": "BATCHROUTE_TEST_KEY", "rpm": 60_000, "tpm": 50_000_000,
                  **model})
    return doc


def key_fragments(text: str, key: str, run: int = 8) -> list[str]:
    """The runs of ``run`` consecutive characters of ``key`` that ``text`` holds, in any case:
    what no stored or logged text may hold. Written apart from batchroute.scrub on purpose."""
    low = text.lower()
    return [key[i:i + run] for i in range(len(key) - run + 1) if key[i:i + run].lower() in low]


# How the tests' stub providers quote a key back: as sent, in capitals, nine characters from
# its middle, inside a JSON document.
def key_echoes(key: str) -> dict[str, str]:
    mid = len(key) // 2 - 4
    return {"verbatim": f"Incorrect API key provided: {key}.",
            "upper": f"INVALID KEY {key.upper()}",
            "middle": f"key ...{key[mid:mid + 9]}... has been revoked",
            "json": json.dumps({"error": "invalid_api_key", "key": key, "hint": key[:12]})}


def quiet_progress() -> Any:
    """Progress that writes nowhere a test would look."""
    import io

    from batchroute.job.progress import Progress

    return Progress(io.StringIO(), interval_s=3600)


def corrupt_page(path: Path, row_group: int, column: str) -> None:
    """Flip bytes in the middle of one column chunk of a written Parquet file, leaving its
    footer (so its schema and metadata) intact."""
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    names = [meta.schema.column(i).name for i in range(meta.num_columns)]
    chunk = meta.row_group(row_group).column(names.index(column))
    first = chunk.dictionary_page_offset or chunk.data_page_offset
    middle = first + chunk.total_compressed_size // 2
    raw = bytearray(path.read_bytes())
    raw[middle:middle + 16] = bytes(b ^ 0xFF for b in raw[middle:middle + 16])
    path.write_bytes(bytes(raw))


class FakeEmbedder:
    """A deterministic stand-in for the sentence embedder: hashed bag of words, L2-normalised.
    Prompts sharing words are close; prompts sharing none are orthogonal."""

    name = "fake-bow-32"
    dim = 32

    def embed(self, texts: Any, batch_size: int = 64) -> Any:
        import zlib

        import numpy as np
        import pyarrow as pa

        items = texts.to_pylist() if isinstance(texts, pa.Array | pa.ChunkedArray) else texts
        out = np.zeros((len(items), self.dim), np.float32)
        for i, t in enumerate(items):
            for word in (t or "").lower().split():
                out[i, zlib.crc32(word.encode()) % self.dim] += 1.0
        norm = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norm == 0, 1.0, norm)


class _VirtualClockSelector(selectors.DefaultSelector):
    """Never waits: a select that would block for ``timeout`` seconds moves the loop's clock
    on by that much instead (only when nothing is ready, which is when the loop would sleep)."""

    def __init__(self, clock: list[float]) -> None:
        super().__init__()
        self._clock = clock

    def select(self, timeout: float | None = None) -> list[Any]:
        ready = super().select(0)
        if not ready and timeout is not None and timeout > 0:
            self._clock[0] += timeout
        return ready


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """An event loop on a fake clock, as aiolimiter's own tests use: ``loop.time()`` starts at
    0 and jumps straight to the next timer whenever every task is waiting, so a test of
    waits and pacing asserts exact times and never sleeps."""

    def __init__(self) -> None:
        self._now = [0.0]
        super().__init__(_VirtualClockSelector(self._now))

    def time(self) -> float:
        return self._now[0]


def run_on_virtual_clock(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on a :class:`VirtualClockLoop`."""
    loop = VirtualClockLoop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.close()


def is_loopback(ip: str) -> bool:
    """Whether a listening socket's address is loopback (127.0.0.0/8, ::1, or a dual-stack
    socket's ::ffff:127.x.x.x)."""
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback
