"""Results rows: the one module that builds them (``schemas/results.schema.json``).

Every input row ends as exactly one results row: ``rejected`` (by the source or route stage,
never sent), ``failed`` (sent and failed, or a dispatch call that itself failed) or ``ok``.
The plan builds the rejected rows, the dispatcher the answered ones, the wiring the rows of a
dispatch call that failed as a whole; all of them through :func:`build`, which knows the columns.

Money: ``cost_micro_usd`` is integer micro-dollars and ``cost_usd`` is always derived from it
here (:func:`add_cost`), so the two never disagree. A row's cost is what its model billed,
plus what its earlier escalation attempts billed (added by the dispatcher when a row comes back
from the next model up), plus what routing it cost (added once, by :func:`with_route_cost`, as
the row reaches the sink).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, TypeAlias

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from batchroute import schemas

# A column's values: an Arrow array, a Python sequence, one value for every row, or None
# (the column's empty value: null, or 0 for the counters).
Values: TypeAlias = pa.Array | pa.ChunkedArray | Sequence[Any] | str | int | float | datetime | None
# What a call bills: the same columns in a results row and in each of its escalation attempts.
BILLED = [f.name for f in schemas.ESCALATION if f.name not in ("model", "reason", "tier")]
_ZERO = set(BILLED)
# Carried unchanged from the routed rows.
_FROM_ROUTED = ("request_id", "reject_reason", "route_reason", "router_scores", "threshold",
                "router_version", "tags")


def schema_for(routed: pa.Schema, outputs: Sequence[pa.Field] = ()) -> pa.Schema:
    """A job's results schema: ``schemas.RESULTS``, then the task's output columns (``label``
    or ``output``, see :func:`batchroute.task.result_fields`), then the input columns the
    routed rows carry (the id column, ``keep_columns``) with their own types."""
    carried = [f for f in routed if f.name not in schemas.ROUTED.names]
    return pa.schema([*schemas.RESULTS, *outputs, *carried])


def build(routed: pa.Table, *, run_id: str, model: Values, status: Values,
          outputs: Sequence[pa.Field] = (), **columns: Values) -> pa.Table:
    """``results`` rows for the ``routed`` rows, one each and in order.

    ``columns`` are the results columns this caller knows (``response``, ``input_tokens``,
    ``cost_micro_usd``, ``error_message``, ...), and the values of the task's ``outputs``
    columns; the rest take their empty value. The route stage's evidence and the routed
    columns are carried over, as are the input columns the routed rows carry; ``cost_usd``
    is derived from ``cost_micro_usd``. Raises KeyError for a name that is not a results
    column.
    """
    n = routed.num_rows
    schema = schema_for(routed.schema, outputs)
    unknown = set(columns) - set(schemas.RESULTS.names) - {f.name for f in outputs}
    if unknown:
        raise KeyError(f"not a results column: {sorted(unknown)[0]}")
    given: dict[str, Values] = {"run_id": run_id, "model": model, "status": status,
                                "finished_at": datetime.now(UTC), **columns}
    evidence = route_evidence(routed)
    cols: dict[str, pa.Array | pa.ChunkedArray] = {}
    for f in schema:
        if f.name == "cost_usd":
            continue
        if (f.name in _FROM_ROUTED or (f.name not in schemas.RESULTS.names
                and f.name in routed.column_names)) and f.name not in given:
            cols[f.name] = routed.column(f.name)
        elif f.name in evidence and f.name not in given:
            cols[f.name] = evidence[f.name]
        else:
            cols[f.name] = _column(given.get(f.name), f, n)
    cols["cost_usd"] = usd(cols["cost_micro_usd"])
    return pa.table({name: cols[name] for name in schema.names}, schema=schema)


def rejected(routed: pa.Table, run_id: str, outputs: Sequence[pa.Field] = ()) -> pa.Table:
    """Final rows for routed rows that will not be sent (their ``reject_reason`` is set)."""
    return with_route_cost(build(routed, run_id=run_id, model=routed.column("model"),
                                 status="rejected", outputs=outputs))


def failed_unsent(routed: pa.Table, run_id: str, model: str, exc: BaseException,
                  outputs: Sequence[pa.Field] = ()) -> pa.Table:
    """``failed`` rows for a batch whose dispatch call itself failed (e.g. the actor died)."""
    return with_route_cost(build(routed, run_id=run_id, model=model, status="failed",
                                 outputs=outputs, error_type="internal",
                                 error_message=f"dispatch call failed: {type(exc).__name__}"))


def add_cost(results: pa.Table, micro: pa.Array | pa.ChunkedArray) -> pa.Table:
    """``results`` with ``micro`` (one integer per row) added to ``cost_micro_usd``."""
    total = pc.add(results.column("cost_micro_usd"), micro)
    return (results.set_column(results.schema.get_field_index("cost_micro_usd"),
                               schemas.RESULTS.field("cost_micro_usd"), total)
            .set_column(results.schema.get_field_index("cost_usd"),
                        schemas.RESULTS.field("cost_usd"), usd(total)))


def with_route_cost(results: pa.Table) -> pa.Table:
    """``results`` with each row's routing cost added to its ``cost_micro_usd``: the one
    place it is added, once per row, after any escalation."""
    route = results.column("route_cost_micro_usd")
    if not pc.any(pc.not_equal(route, 0)).as_py():
        return results
    return add_cost(results, route)


def route_evidence(routed: pa.Table) -> dict[str, pa.ChunkedArray | pa.Array]:
    """The route stage's evidence columns, carried from ``routed`` into ``results``."""
    n = routed.num_rows
    return {f.name: (routed.column(f.name) if f.name in routed.column_names
                     else pa.array(np.zeros(n, np.int64)) if not f.nullable
                     else pa.nulls(n, f.type)) for f in schemas.ROUTE_EVIDENCE}


def timestamps(seconds: Sequence[float | None]) -> pa.Array:
    """A ``started_at``/``finished_at`` column from seconds since the epoch (None: null),
    built in numpy: pyarrow converts a list of datetimes one Python object at a time."""
    values = np.array(seconds, np.float64)  # None becomes NaN
    missing = np.isnan(values)
    micros = np.rint(np.where(missing, 0.0, values) * 1e6).astype(np.int64)
    return pa.array(micros, schemas.RESULTS.field("started_at").type, mask=missing)


def usd(micro: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    return pc.divide(pc.cast(micro, pa.float64()), 1e6)


def _column(values: Values, f: pa.Field, n: int) -> pa.Array | pa.ChunkedArray:
    if isinstance(values, pa.Array | pa.ChunkedArray):
        return values if values.type == f.type else values.cast(f.type)
    if values is None:
        if f.name in _ZERO:
            return pa.array(np.zeros(n, f.type.to_pandas_dtype()), f.type)
        return pa.nulls(n, f.type)
    if isinstance(values, str | int | float | datetime):
        return pa.repeat(pa.scalar(values, f.type), n)
    return pa.array(values, f.type)
