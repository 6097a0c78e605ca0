"""The job store: one table of jobs in SQLAlchemy 2.x (SQLite by default, PostgreSQL by URL).

This is the only module that talks SQL. Every state change is one conditional UPDATE
(``... WHERE status IN (...)``) so that concurrent workers, the API and the reaper never move a
job backwards: a cancelled job stays cancelled even if its pipeline finishes a moment later, and
only one worker can claim a queued job.

States: ``queued -> running -> succeeded | failed | cancelled``; ``running -> queued`` when a
worker died and the job gets another attempt; ``queued -> cancelled``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    JSON,
    DateTime,
    Float,
    Integer,
    String,
    Text,
    bindparam,
    create_engine,
    delete,
    event,
    exc,
    func,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from solver.errors import NotFoundError

from .errors import UnavailableError

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = (
    "queued",
    "running",
    "succeeded",
    "failed",
    "cancelled",
)
STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
ACTIVE = (QUEUED, RUNNING)
MAX_SQL_INT = 2**63 - 1
FINISHED = (SUCCEEDED, FAILED, CANCELLED)


def new_job_id() -> str:
    """A fresh job id: 32 lowercase hex digits (uuid4)."""
    return uuid.uuid4().hex


def is_job_id(value: str) -> bool:
    return len(value) == 32 and all(c in "0123456789abcdef" for c in value)


def _now() -> datetime:
    return datetime.now(UTC)


def _utc(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes even for timezone=True columns; they were stored as UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value



# The columns a running job gets back when it returns to the queue (shutdown or lost worker).
_BACK_TO_QUEUE = {
    "status": QUEUED, "stage": "requeued", "progress": 0.0, "started_at": None,
    "heartbeat_at": None,
}

class _Base(DeclarativeBase):
    pass


class JobRow(_Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    stage: Mapped[str | None] = mapped_column(String(32))
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    heartbeat_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    error_detail: Mapped[Any] = mapped_column(JSON, nullable=True)
    constraints: Mapped[Any] = mapped_column(JSON)
    model_name: Mapped[str | None] = mapped_column(String(255))
    model_path: Mapped[str] = mapped_column(Text)
    calib_path: Mapped[str] = mapped_column(Text)
    out_dir: Mapped[str] = mapped_column(Text)
    summary: Mapped[Any] = mapped_column(JSON, nullable=True)
    # Columns added after the first release are nullable: _add_missing_columns adds them to a
    # job store created before them.
    parent_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    stage_eta_s: Mapped[float | None] = mapped_column(Float, nullable=True)


@dataclass(frozen=True)
class Job:
    """A detached snapshot of one job row (times are timezone-aware UTC)."""

    id: str
    status: str
    stage: str | None
    progress: float
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None
    attempts: int
    error_code: str | None
    error_message: str | None
    error_detail: Any
    constraints: Any
    model_name: str | None
    model_path: str
    calib_path: str
    out_dir: str
    summary: Any
    parent_id: str | None = None  # the job this one re-plans (POST /jobs/{id}/replan)
    stage_eta_s: float | None = None  # seconds left in the stage, as last reported

    @property
    def error(self) -> dict[str, Any] | None:
        if self.error_code is None:
            return None
        return {"code": self.error_code, "message": self.error_message, "detail": self.error_detail}

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Job:
        """The snapshot of a ``jobs`` row (a Core result mapping): every field by its column's
        name, times made timezone-aware (the one place a row becomes a Job)."""
        return cls(**{name: _utc(row[name]) if name in _TIMES else row[name]
                      for name in _FIELDS})


_FIELDS = tuple(f.name for f in fields(Job))
_TIMES = frozenset(c.name for c in JobRow.__table__.columns if isinstance(c.type, DateTime))
_JOBS = JobRow.__table__
_GET = select(_JOBS).where(_JOBS.c.id == bindparam("id"))


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL and a busy timeout so API and workers can share it."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record) -> None:  # noqa: ANN001 - DBAPI connection
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def _add_missing_columns(engine: Engine) -> None:
    """Add the nullable columns a job store made by an older bitplan lacks (create_all only
    creates missing tables)."""
    have = {c["name"] for c in inspect(engine).get_columns(JobRow.__tablename__)}
    missing = [c for c in JobRow.__table__.columns if c.name not in have]
    if not missing:
        return
    with engine.begin() as conn:
        for column in missing:
            if not column.nullable:
                raise RuntimeError(f"job store lacks the non-nullable column {column.name!r}")
            kind = column.type.compile(engine.dialect)
            table = JobRow.__tablename__
            conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {column.name} {kind}"))


class JobStore:
    """Create, read and move jobs between states. Thread-safe (a session per call)."""

    def __init__(self, url: str) -> None:
        """Connect and create the table if missing. Raises UnavailableError (a clear message,
        password hidden) when the database does not answer."""
        self.engine = make_engine(url)
        try:
            _Base.metadata.create_all(self.engine)
            _add_missing_columns(self.engine)
        except exc.DBAPIError as error:
            self.engine.dispose()
            where = self.engine.url.render_as_string(hide_password=True)
            reason = str(error.orig).strip().splitlines()[0] if error.orig else str(error)
            raise UnavailableError(
                f"the job store at {where} does not answer ({reason}); start it or fix "
                "BITPLAN_DATABASE_URL"
            ) from None
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        # a file on this machine: a read takes microseconds (no network round trip)
        self.local = self.engine.dialect.name == "sqlite"

    def close(self) -> None:
        self.engine.dispose()

    # Reading --------------------------------------------------------------------------------

    def ping(self) -> bool:
        """True when the database answers."""
        try:
            with self._session() as s:
                s.execute(select(1))
            return True
        except Exception:  # noqa: BLE001 - any failure means "not healthy"
            return False

    def get(self, job_id: str) -> Job:
        """The job ``job_id``. Raises NotFoundError.

        One Core SELECT on a pooled connection (no ORM session): this is the poll path."""
        row = None
        if is_job_id(job_id):
            with self.engine.connect() as conn:
                row = conn.execute(_GET, {"id": job_id}).mappings().first()
        if row is None:
            raise NotFoundError(f"no job {job_id!r}: check the id returned by POST /plan")
        return Job.from_row(row)

    def list(
        self, offset: int = 0, limit: int = 50, status: str | None = None
    ) -> tuple[list[Job], int]:
        """(jobs newest first, total count), optionally only those with ``status``."""
        # SQL integers are 64-bit: an offset past any table's size reads nothing either way.
        offset, limit = min(max(offset, 0), MAX_SQL_INT), min(max(limit, 0), MAX_SQL_INT)
        query = select(_JOBS)
        count = select(func.count()).select_from(_JOBS)
        if status is not None:
            query = query.where(_JOBS.c.status == status)
            count = count.where(_JOBS.c.status == status)
        query = query.order_by(_JOBS.c.created_at.desc(), _JOBS.c.id).offset(offset).limit(limit)
        with self.engine.connect() as conn:
            rows = conn.execute(query).mappings().all()
            total = int(conn.scalar(count) or 0)
        return [Job.from_row(r) for r in rows], total

    def ids_with_status(self, status: str, created_before: datetime | None = None) -> list[str]:
        with self._session() as s:
            query = select(JobRow.id).where(JobRow.status == status)
            if created_before is not None:
                query = query.where(JobRow.created_at < created_before)
            return list(s.scalars(query.order_by(JobRow.created_at)).all())

    def status(self, job_id: str) -> str | None:
        with self._session() as s:
            return s.scalar(select(JobRow.status).where(JobRow.id == job_id))

    # Writing --------------------------------------------------------------------------------

    def create(
        self,
        job_id: str,
        constraints: dict[str, Any],
        model_path: str,
        calib_path: str,
        out_dir: str,
        model_name: str | None = None,
        parent_id: str | None = None,
    ) -> Job:
        """Record a new queued job."""
        row = JobRow(
            id=job_id,
            status=QUEUED,
            stage=None,
            progress=0.0,
            created_at=_now(),
            attempts=0,
            constraints=constraints,
            model_name=model_name,
            parent_id=parent_id,
            model_path=model_path,
            calib_path=calib_path,
            out_dir=out_dir,
        )
        with self._session.begin() as s:
            s.add(row)
        return self.get(job_id)

    def _transition(self, job_id: str, from_states: Iterable[str], **values: Any) -> bool:
        with self._session.begin() as s:
            result = s.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.status.in_(tuple(from_states)))
                .values(**values)
            )
            return result.rowcount == 1

    def claim(self, job_id: str) -> Job | None:
        """Move a queued job to running (one attempt more); None when it is not queued."""
        now = _now()
        with self._session.begin() as s:
            result = s.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.status == QUEUED)
                .values(
                    status=RUNNING,
                    started_at=now,
                    heartbeat_at=now,
                    attempts=JobRow.attempts + 1,
                    stage="queued",
                    progress=0.0,
                )
            )
            if result.rowcount != 1:
                return None
        return self.get(job_id)

    def update_progress(self, job_id: str, stage: str, progress: float,
                        eta_s: float | None = None) -> bool:
        """Record progress, the stage's estimated time left (None: not known yet) and a
        heartbeat; False when the job is no longer running."""
        return self._transition(
            job_id,
            (RUNNING,),
            stage=stage,
            progress=min(max(float(progress), 0.0), 1.0),
            stage_eta_s=None if eta_s is None else max(float(eta_s), 0.0),
            heartbeat_at=_now(),
        )

    def heartbeat(self, job_id: str) -> bool:
        """Mark the running job alive; False when it is no longer running."""
        return self._transition(job_id, (RUNNING,), heartbeat_at=_now())

    def mark_succeeded(self, job_id: str, summary: Any = None) -> bool:
        return self._transition(
            job_id,
            (RUNNING,),
            status=SUCCEEDED,
            stage="done",
            progress=1.0,
            finished_at=_now(),
            summary=summary,
            error_code=None,
            error_message=None,
            error_detail=None,
        )

    def mark_failed(self, job_id: str, code: str, message: str, detail: Any = None) -> bool:
        """Fail a queued or running job with an error ``{code, message, detail}``."""
        return self._transition(
            job_id,
            ACTIVE,
            status=FAILED,
            finished_at=_now(),
            error_code=code,
            error_message=message,
            error_detail=detail,
        )

    def mark_cancelled(self, job_id: str) -> bool:
        """Cancel a queued or running job; False when it had already finished."""
        return self._transition(
            job_id,
            ACTIVE,
            status=CANCELLED,
            finished_at=_now(),
            error_code="cancelled",
            error_message="the job was cancelled by a DELETE request",
            error_detail=None,
        )

    def release(self, job_id: str) -> bool:
        """Put a running job back in the queue without counting the attempt (worker shutdown)."""
        return self._transition(job_id, (RUNNING,), **_BACK_TO_QUEUE,
                                attempts=JobRow.attempts - 1)

    def requeue_stale(
        self, stale_before: datetime, max_attempts: int, alive: Iterable[str] = ()
    ) -> tuple[list[str], list[str]]:
        """Running jobs whose last heartbeat is older than ``stale_before`` lost their worker.

        Those with attempts left go back to queued; the others fail with code ``worker_lost``.
        ``alive``: jobs the caller is running itself (never orphaned, whatever the clock says;
        their heartbeat is refreshed). Returns (requeued ids, failed ids); the caller enqueues
        the requeued ones.
        """
        requeued, failed = [], []
        alive = set(alive)
        with self._session() as s:
            rows = s.execute(
                select(JobRow.id, JobRow.attempts).where(
                    JobRow.status == RUNNING, JobRow.heartbeat_at < stale_before
                )
            ).all()
        for job_id, attempts in rows:
            if job_id in alive:
                self.heartbeat(job_id)
                continue
            if attempts < max_attempts:
                if self._transition(job_id, (RUNNING,), **_BACK_TO_QUEUE):
                    requeued.append(job_id)
            elif self._transition(
                job_id,
                (RUNNING,),
                status=FAILED,
                finished_at=_now(),
                error_code="worker_lost",
                error_message=(
                    f"the worker running this job stopped responding {attempts} time(s); "
                    "it is not retried again. Resubmit it, and check the worker's logs "
                    "(out of memory?)"
                ),
                error_detail={"attempts": attempts},
            ):
                failed.append(job_id)
        return requeued, failed

    def delete_finished(self, ids: Iterable[str]) -> int:
        """Delete the rows of those of ``ids`` that have ended; returns how many went."""
        ids = list(ids)
        if not ids:
            return 0
        with self._session() as s:
            gone = s.execute(delete(JobRow).where(JobRow.id.in_(ids),
                                                  JobRow.status.in_(FINISHED))).rowcount
            s.commit()
        return int(gone or 0)

    def ended_before(self, finished_before: datetime) -> list[str]:
        """Ids of the jobs that ended before ``finished_before`` (oldest first)."""
        with self._session() as s:
            return list(s.scalars(select(JobRow.id).where(
                JobRow.status.in_(FINISHED), JobRow.finished_at < finished_before
            ).order_by(JobRow.finished_at)).all())

    def fail_overdue(self, started_before: datetime, timeout_s: float) -> list[str]:
        """Fail running jobs started before ``started_before`` (they exceeded the job timeout)."""
        with self._session() as s:
            ids = list(
                s.scalars(
                    select(JobRow.id).where(
                        JobRow.status == RUNNING, JobRow.started_at < started_before
                    )
                ).all()
            )
        return [
            job_id
            for job_id in ids
            if self._transition(
                job_id,
                (RUNNING,),
                status=FAILED,
                finished_at=_now(),
                error_code="timeout",
                error_message=(
                    f"the job ran longer than BITPLAN_JOB_TIMEOUT_S={timeout_s:g} s; lower "
                    "hessian.max_iter or the calibration size, or raise the timeout"
                ),
                error_detail={"timeout_s": timeout_s},
            )
        ]


def age_cutoff(seconds: float) -> datetime:
    """The instant ``seconds`` ago, for the stale / overdue queries."""
    return _now() - timedelta(seconds=seconds)
