"""Airflow DAGs that submit batchroute to a running Ray cluster through the Ray Jobs API.

- ``batchroute_nightly`` runs every night on yesterday's queue partition. The run id is the
  date, so an Airflow retry resubmits the same run and batchroute resumes it: rows already
  ``ok`` are neither sent nor paid for again.
- ``batchroute_backfill`` is triggered by hand with ``{"from": "YYYY-MM-DD", "to": ...}``;
  ``batchroute backfill`` skips days already complete and resumes unfinished ones.

Needs ``ray[default]`` (the Jobs SDK) in the Airflow workers, and the Airflow connection or
variable ``RAY_DASHBOARD`` (e.g. ``http://ray-head.batchroute.svc:8265``). Provider keys live
on the Ray cluster (infra/rayjob.yaml, infra/cluster-aws.yaml), never in Airflow.

This file is an example deployed into Airflow's dags folder; the project's tests read it as
text (tests/unit/test_infra.py) and neither Ruff's nor mypy's paths include it.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from typing import Any

from airflow import DAG
from airflow.models import Variable
from airflow.operators.python import PythonOperator

JOB_FILE = "/home/ray/batchroute/jobs/nightly-summarise.toml"  # the image's WORKDIR
# Airflow renders these templates; tests/unit/test_infra.py parses them with the CLI's parser.
NIGHTLY_ENTRYPOINT = (
    f"batchroute run {JOB_FILE} --input s3://example-bucket/queue/dt={{{{ ds }}}}/ "
    "--run-id nightly-summarise-{{ ds }}"
)
BACKFILL_ENTRYPOINT = (
    f"batchroute backfill {JOB_FILE} --input s3://example-bucket/queue/ "
    "--from {{ params['from'] }} --to {{ params['to'] }} --json"
)
# batchroute's exit codes: 0 ok, 1 some rows failed (a retry resumes and retries them),
# 2 bad job file, input or key (a retry cannot help), 3 other.
POLL_S = 30


def submit_and_wait(entrypoint: str, submission_id: str, **_: Any) -> None:
    """Submit ``entrypoint`` as a Ray job and wait for it; raise if it does not succeed."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(Variable.get("RAY_DASHBOARD"))
    job_id = client.submit_job(entrypoint=entrypoint, submission_id=submission_id)
    while (status := client.get_job_status(job_id)) not in {
            JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        time.sleep(POLL_S)
    if status != JobStatus.SUCCEEDED:
        tail = client.get_job_logs(job_id)[-4000:]
        raise RuntimeError(f"Ray job {job_id} ended {status}:\n{tail}")


DEFAULTS = {"owner": "data-platform", "retries": 2, "retry_delay": timedelta(minutes=15)}

with DAG(
    dag_id="batchroute_nightly",
    schedule="0 2 * * *",
    start_date=datetime(2026, 11, 1),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULTS,
    tags=["batchroute"],
):
    PythonOperator(
        task_id="route_and_dispatch",
        python_callable=submit_and_wait,
        op_kwargs={"entrypoint": NIGHTLY_ENTRYPOINT,
                   # Unique per attempt (the Jobs API refuses a reused id); the run id in the
                   # entrypoint stays the same, so the attempt resumes the run.
                   "submission_id": "nightly-{{ ds }}-try{{ ti.try_number }}"},
        execution_timeout=timedelta(hours=12),
    )

with DAG(
    dag_id="batchroute_backfill",
    schedule=None,
    start_date=datetime(2026, 11, 1),
    catchup=False,
    params={"from": "2026-11-01", "to": "2026-11-07"},
    default_args=DEFAULTS,
    tags=["batchroute"],
):
    PythonOperator(
        task_id="backfill",
        python_callable=submit_and_wait,
        op_kwargs={"entrypoint": BACKFILL_ENTRYPOINT,
                   "submission_id": "backfill-{{ params['from'] }}-{{ params['to'] }}"
                                    "-{{ ts_nodash }}-try{{ ti.try_number }}"},
        execution_timeout=timedelta(hours=48),
    )
