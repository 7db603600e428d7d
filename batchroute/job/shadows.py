"""The shadow checks of a run ([quality]), wired: sample, call, grade, roll up.

Runs after the dispatch stage, with its actors still up. Each step commits what it did into
``RUN/quality/``, so a resumed run goes on where the last one stopped:

    sample.parquet    the sampled rows (request_id, model, route_stage), drawn once
    answers/          the reference model's results rows for them (shadow calls)
    shadows/          the graded pairs (schemas.SHADOWS)
    quality.parquet   the rollup (schemas.QUALITY)

The shadow calls are journalled like the run's own (:mod:`batchroute.stages.journal`, in the
shadow rows' run folder ``quality/RUN_ID-shadow/``): a resume commits what a killed run was
answered and counts the calls it had in flight as unrecovered. Judge calls are not
journalled: those in flight at a kill (at most ``batches_in_flight x batch_rows``) are sent
again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from batchroute import judge, schemas, task
from batchroute.config import JobConfig
from batchroute.job import cluster
from batchroute.stages import journal, quality
from batchroute.stages.dispatch import batch_tier
from batchroute.stages.sink import RunFolder

log = logging.getLogger("batchroute")
SAMPLE = "sample.parquet"
ROLLUP = "quality.parquet"


def _read(folder: RunFolder, directory: str, columns: list[str] | None = None,
          ids: pa.Array | None = None) -> pa.Table | None:
    """Every committed shard below ``directory`` (only ``columns``; only rows whose
    request_id is in ``ids``), or None when there is none."""
    parts = []
    for path in folder.shards(directory):
        table = pq.read_table(path, filesystem=folder.fs, columns=columns)
        if ids is not None:
            table = table.filter(pc.is_in(table.column("request_id"), value_set=ids))
        parts.append(table)
    return pa.concat_tables(parts, promote_options="permissive") if parts else None


def _ids(table: pa.Table | None) -> pa.Array:
    if table is None or not table.num_rows:
        return pa.array([], pa.string())
    return table.column("request_id").combine_chunks()


def _batches(table: pa.Table, rows: int) -> Iterator[pa.Table]:
    for start in range(0, table.num_rows, rows):
        yield table.slice(start, rows)


class _Routed:
    """The sampled rows' routed rows (without their model), read from ``routed/`` once
    however many steps need them: the plan holds every row's prompt, the sample a few."""

    def __init__(self, folder: RunFolder, sampled: pa.Table) -> None:
        self._folder, self._sampled = folder, sampled
        self._table: pa.Table | None = None

    def of(self, rows: pa.Table) -> pa.Table | None:
        """Those of the request ids in ``rows`` (None when there is none)."""
        if self._table is None:
            routed = _read(self._folder, self._folder.sub("routed"), None,
                           _ids(self._sampled))
            if routed is None:
                routed = pa.table({"request_id": pa.array([], pa.string())})
            self._table = (routed.drop_columns(["model"]) if "model" in routed.column_names
                           else routed)
        picked = self._table.filter(pc.is_in(self._table.column("request_id"),
                                             value_set=_ids(rows)))
        return picked if picked.num_rows else None


def run(job: JobConfig, folder: RunFolder, actors: cluster.DispatchActors, *,
        started_at: str = "", stop: Callable[[], None] = lambda: None
        ) -> tuple[pa.Table, dict[str, Any]]:
    """Shadow-check the run in ``folder`` (started at ``started_at``, for the batch tier's
    deadline); return its quality table and the manifest's summary."""
    qc = job.quality
    ref = job.reference_model
    results_dir = folder.sub("results")
    qdir = folder.sub("quality")
    answered = _read(folder, results_dir, ["request_id", "model", "status", "route_stage"])
    if answered is None:
        answered = pa.table({"request_id": pa.array([], pa.string()),
                             "model": pa.array([], pa.string()),
                             "status": pa.array([], pa.string()),
                             "route_stage": pa.array([], pa.string())})
    if folder.has("quality", SAMPLE):
        sampled = pq.read_table(folder.sub("quality", SAMPLE), filesystem=folder.fs)
    else:
        sampled = quality.sample(quality.candidates(answered, ref), share=qc.shadow_share,
                                 seed=qc.seed)
        folder.write_table(qdir, SAMPLE, sampled)

    # 1. The reference model's answers (shadow calls), at its batch tier if it has one. The
    # calls are journalled (and batches kept in a ledger) in a run folder of the shadow rows
    # alone under quality/: a resume first commits what a killed run was answered.
    sub = shadow_folder(folder)
    routed_rows = _Routed(folder, sampled)
    answers_dir = folder.sub("quality", "answers")
    unrecovered = _recover(folder, sub)
    got = _ids(_read(folder, answers_dir, ["request_id"]))
    todo = sampled.filter(pc.invert(pc.is_in(sampled.column("request_id"), value_set=got)))
    seq = len(folder.shards(answers_dir))
    failed_calls = 0
    if todo.num_rows and job.models[ref].tier == "batch":
        if not sub.shards(sub.routed_dir(ref)):
            routed = routed_rows.of(sampled)
            if routed is not None:
                sub.write_table(sub.routed_dir(ref), sub.shard_name(0), routed)
        log.info("shadow checks: %d rows also sent to %s through its batch tier",
                 todo.num_rows, ref)
        deadline = batch_tier.deadline_of(job.dispatch.deadline, started_at)
        for answers in actors.batch_each(ref, sub, got, deadline, stop=stop):
            folder.write_table(answers_dir, folder.shard_name(seq), answers)
            seq += 1
    elif todo.num_rows:
        routed = routed_rows.of(todo)
        if routed is not None:
            log.info("shadow checks: %d rows also sent to %s", routed.num_rows, ref)
            for _, answers in actors.each(ref, "shadow",
                                          _batches(routed, job.dispatch.batch_rows), sub,
                                          stop=stop):
                if answers is None:
                    failed_calls += 1
                    continue
                folder.write_table(answers_dir, folder.shard_name(seq), answers)
                seq += 1
    if not failed_calls:
        # Every answer is in a committed shard; what the provider billed for answers that
        # could not be used (a malformed 2xx body) is in the journal's last snapshot.
        for model, micro in journal.read(sub).unrecovered_micro_usd.items():
            if micro:
                unrecovered[model] = unrecovered.get(model, 0) + micro
        journal.clear(sub)

    # 2. Grading: fields, or the judge.
    graded = _ids(_read(folder, folder.sub("quality", "shadows"), ["request_id"]))
    answers_all = _read(folder, folder.sub("quality", "answers"))
    if answers_all is not None:
        answers_all = answers_all.filter(pc.invert(pc.is_in(
            answers_all.column("request_id"), value_set=graded)))
    # A sampled row whose shadow call failed at the actor (no answers row) stays ungraded;
    # one the reference answered with an error is graded as failed.
    if answers_all is not None and answers_all.num_rows:
        _grade(job, folder, actors, sampled, answers_all, routed_rows, stop)

    shadows = _read(folder, folder.sub("quality", "shadows"))
    if shadows is None:
        shadows = schemas.SHADOWS.empty_table()
    ok_rows = answered.filter(pc.equal(answered.column("status"), "ok"))
    table = quality.rollup(ok_rows, shadows, reference=ref, run_id=folder.run_id,
                           seed=qc.seed)
    folder.write_table(qdir, ROLLUP, table)
    summary = quality.summary(table, min_retained=qc.min_retained, share=qc.shadow_share,
                              judge_model=qc.judge)
    summary["sampled"] = sampled.num_rows
    summary["unrecovered_micro_usd"] = unrecovered
    return table, summary


def shadow_folder(folder: RunFolder) -> RunFolder:
    """The run folder of the shadow rows alone (routed rows, journal, batch ledger)."""
    return RunFolder(folder.sub("quality"), f"{folder.run_id}-shadow", fs=folder.fs)


def _wait_quiet(sub: RunFolder) -> None:
    from batchroute.job.runner import JOURNAL_WAIT_S

    journal.wait_quiet(sub, quiet_s=cluster.DRIVER_TIMEOUT_S + 1.0, max_wait_s=JOURNAL_WAIT_S)


def _recover(folder: RunFolder, sub: RunFolder,
             wait: Callable[[RunFolder], None] = _wait_quiet) -> dict[str, int]:
    """Commit the shadow answers a killed run journalled but did not commit; return the
    calls it had in flight and never got back, per model (paid, unrecovered). First
    ``wait``s, as the run's own resume does, for a killed run's actors to finish
    journalling."""
    wait(sub)
    answers_dir = folder.sub("quality", "answers")
    rows, lost = journal.read(sub).settle(_ids(_read(folder, answers_dir, ["request_id"])))
    if rows.num_rows:
        folder.write_table(answers_dir, folder.shard_name(len(folder.shards(answers_dir))),
                           rows)
        log.info("shadow checks: %d answers paid for before the interruption are committed "
                 "from the journal, not sent again", rows.num_rows)
    journal.clear(sub)
    return {m: v for m, v in lost.items() if v}


def _grade(job: JobConfig, folder: RunFolder, actors: cluster.DispatchActors,
           sampled: pa.Table, answers: pa.Table, routed_rows: _Routed,
           stop: Callable[[], None]) -> None:
    ref = job.reference_model
    ids = _ids(answers)
    keep = ["request_id", "response", *[f.name for f in task.result_fields(job.task.output)]]
    kept = _read(folder, folder.sub("results"), [*keep, "status"], ids)
    assert kept is not None
    kept = kept.filter(pc.equal(kept.column("status"), "ok")).select(keep)
    # Align by id: the sampled rows (model, stage) whose kept answer and reference answer
    # are both at hand, each beside both (takes, not a join: outputs may be structs).
    ids = pc.filter(ids, pc.is_in(ids, value_set=kept.column("request_id")))
    pick = sampled.filter(pc.is_in(sampled.column("request_id"), value_set=ids))
    ids = pick.column("request_id")
    mine = kept.take(pc.index_in(ids, value_set=kept.column("request_id")))
    theirs = answers.take(pc.index_in(ids, value_set=answers.column("request_id")))
    pairs = pick.select(["request_id", "model", "route_stage"])
    for c in keep[1:]:
        pairs = pairs.append_column(c, mine.column(c)).append_column(f"ref_{c}", theirs.column(c))
    pairs = (pairs.append_column("ref_status", theirs.column("status"))
             .append_column("ref_error", theirs.column("error_message"))
             .append_column("ref_cost", theirs.column("cost_micro_usd")))
    seq = len(folder.shards(folder.sub("quality", "shadows")))
    if job.task.output.structured:
        fields = task.result_fields(job.task.output)
        ok = pc.equal(pairs.column("ref_status"), "ok").to_pylist()
        scores = quality.field_scores(
            pairs.select([f.name for f in fields]),
            pairs.select([f"ref_{f.name}" for f in fields]).rename_columns(
                [f.name for f in fields]), fields)
        table = quality.shadow_table(
            pairs.select(["request_id", "model", "route_stage"]), reference_model=ref,
            status=["ok" if o else "failed" for o in ok],
            score=[float(s) if o else None for s, o in zip(scores, ok, strict=True)],
            graded_by="fields", reference_response=pairs.column("ref_response").to_pylist(),
            errors=pairs.column("ref_error").to_pylist(),
            cost=pairs.column("ref_cost").to_pylist())
        folder.write_table(folder.sub("quality", "shadows"), folder.shard_name(seq), table)
        return

    # Free text: the judge grades each pair whose reference answered.
    answered_ref = pc.equal(pairs.column("ref_status"), "ok")
    failed = pairs.filter(pc.invert(answered_ref))
    if failed.num_rows:
        folder.write_table(folder.sub("quality", "shadows"), folder.shard_name(seq),
                           _failed(failed, ref, "the reference model did not answer"))
        seq += 1
    to_judge = pairs.filter(answered_ref)
    if not to_judge.num_rows:
        return
    routed = routed_rows.of(to_judge)
    assert routed is not None
    order = pc.index_in(to_judge.column("request_id"), value_set=routed.column("request_id"))
    routed = routed.take(order)
    requests = quality.judge_rows(routed, to_judge.column("response").to_pylist(),
                                  to_judge.column("ref_response").to_pylist())
    by_id = {rid: i for i, rid in enumerate(to_judge.column("request_id").to_pylist())}
    for sent, verdicts in actors.each(job.quality.judge, "judge",
                                      _batches(requests, job.dispatch.batch_rows), stop=stop):
        rows = to_judge.take(pa.array([by_id[r] for r in
                                       sent.column("request_id").to_pylist()], pa.int64()))
        if verdicts is None:
            table = _failed(rows, ref, "the judge call failed")
        else:
            table = _judged(rows, verdicts, ref)
        folder.write_table(folder.sub("quality", "shadows"), folder.shard_name(seq), table)
        seq += 1


def _judged(rows: pa.Table, verdicts: pa.Table, ref: str) -> pa.Table:
    grades = [judge.read(t) if s == "ok" else None for t, s in zip(
        verdicts.column("response").to_pylist(), verdicts.column("status").to_pylist(),
        strict=True)]
    errors = [None if g is not None else (e or "the judge's answer is not two grades")
              for g, e in zip(grades, verdicts.column("error_message").to_pylist(),
                              strict=True)]
    return quality.shadow_table(
        rows.select(["request_id", "model", "route_stage"]), reference_model=ref,
        status=["ok" if g is not None else "failed" for g in grades],
        score=[judge.relative(*g) if g is not None else None for g in grades],
        graded_by="judge", candidate=[g[0] if g else None for g in grades],
        reference=[g[1] if g else None for g in grades],
        reference_response=rows.column("ref_response").to_pylist(), errors=errors,
        cost=rows.column("ref_cost").to_pylist(),
        judge_cost=verdicts.column("cost_micro_usd").to_pylist())


def _failed(rows: pa.Table, ref: str, why: str) -> pa.Table:
    n = rows.num_rows
    return quality.shadow_table(
        rows.select(["request_id", "model", "route_stage"]), reference_model=ref,
        status=["failed"] * n, score=[None] * n, graded_by="judge",
        reference_response=rows.column("ref_response").to_pylist(),
        errors=[e or why for e in rows.column("ref_error").to_pylist()],
        cost=rows.column("ref_cost").to_pylist())
