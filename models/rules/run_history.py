"""Run history: every check of every detector definition, and how far the rules service had read.

SQLite file by default (WAL, so `anomstream runs` and `chart` can read while the service writes);
PostgreSQL with a `postgresql+psycopg://...` URL, whose driver is the `postgres` extra
(`pip install 'anomstream[postgres]'`; the Docker image: build arg EXTRAS=postgres). A check is stored once per (definition,
version, group, window start): re-recording it after a restart, when the service re-reads from its
last commit, inserts nothing. Each group's state is stored with its check, so the service resumes
a definition from `latest_states`.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import asdict, is_dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Index,
    Integer,
    String,
    UniqueConstraint,
    and_,
    case,
    create_engine,
    event,
    func,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.types import TypeDecorator

from models.rules.engine import Check

DIALECT_INSERTS = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}
POSTGRES_DRIVER = "psycopg"  # psycopg 3, the `postgres` extra


def check_driver(url) -> None:
    """A PostgreSQL URL names psycopg (3) as its driver and psycopg is installed; else a ValueError
    that says how to fix it, instead of SQLAlchemy's ModuleNotFoundError at the first connection."""
    if url.get_backend_name() != "postgresql":
        return
    shown = url.render_as_string()
    if url.get_driver_name() != POSTGRES_DRIVER:
        raise ValueError(f"run history URL {shown!r}: write postgresql+{POSTGRES_DRIVER}://user:password@host/db "
                         f"(the driver anomstream installs is psycopg 3, not {url.get_driver_name()})")
    if importlib.util.find_spec(POSTGRES_DRIVER) is None:
        raise ValueError(f"run history URL {shown!r} needs the PostgreSQL driver, which is not installed: "
                         "pip install 'anomstream[postgres]' (the Docker image: build it with EXTRAS=postgres, "
                         "as docker/docker-compose.yml does)")


class UTCDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend: SQLite keeps no offset, so it stores naive
    UTC and gets UTC put back on reading."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the run history stores UTC-aware datetimes")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    pass


class RuleCheck(Base):
    __tablename__ = "rule_checks"
    __table_args__ = (
        UniqueConstraint("definition", "version", "group_key", "window_start", name="uq_rule_checks_window"),
        Index("ix_rule_checks_definition_end", "definition", "window_end"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    definition: Mapped[str] = mapped_column(String(128), index=True)
    version: Mapped[str] = mapped_column(String(64))
    group_key: Mapped[str] = mapped_column(String(512))
    topic: Mapped[str] = mapped_column(String(249))
    window_start: Mapped[datetime] = mapped_column(UTCDateTime)
    window_end: Mapped[datetime] = mapped_column(UTCDateTime)
    status: Mapped[str] = mapped_column(String(16))
    fired: Mapped[bool] = mapped_column(Boolean)
    messages: Mapped[int] = mapped_column(Integer)
    values: Mapped[dict] = mapped_column(JSON)
    conditions: Mapped[list] = mapped_column(JSON)
    actions: Mapped[list] = mapped_column(JSON)
    state: Mapped[dict] = mapped_column(JSON)
    recorded_at: Mapped[datetime] = mapped_column(UTCDateTime)


class RuleProgress(Base):
    """Per partition, the highest offset + 1 the rules service had processed when it recorded."""

    __tablename__ = "rule_progress"

    consumer_group: Mapped[str] = mapped_column(String(255), primary_key=True)
    topic: Mapped[str] = mapped_column(String(249), primary_key=True)
    partition: Mapped[int] = mapped_column(Integer, primary_key=True)
    offset: Mapped[int] = mapped_column(Integer)


def json_safe(value):
    """Non-finite floats -> None (JSON has no NaN, PostgreSQL refuses it); tuples -> lists."""
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def utc(epoch_s: float) -> datetime:
    return datetime.fromtimestamp(epoch_s, timezone.utc)


def _as_dict(outcome) -> dict:
    return asdict(outcome) if is_dataclass(outcome) else dict(outcome)


class RunHistory:
    def __init__(self, url: str):
        parsed = make_url(url)
        if parsed.get_backend_name() not in DIALECT_INSERTS:
            raise ValueError(f"run history URL {parsed.render_as_string()!r}: only sqlite:///PATH and "
                             "postgresql+psycopg://... are supported")
        check_driver(parsed)
        self.dialect = parsed.get_backend_name()
        if self.dialect == "sqlite" and parsed.database and parsed.database != ":memory:" \
                and not parsed.database.startswith("file:"):
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        self.engine = create_engine(url, pool_pre_ping=self.dialect != "sqlite")
        if self.dialect == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        Base.metadata.create_all(self.engine)

    def record(self, checks: list[Check], progress: dict[tuple[str, int], int], consumer_group: str) -> int:
        """Store the checks and the progress in one transaction; a check already stored (same
        definition, version, group and window start) is skipped. Returns the rows inserted."""
        now = datetime.now(timezone.utc)
        rows = [{
            "definition": c.definition, "version": c.version, "group_key": c.group, "topic": c.topic,
            "window_start": utc(c.window_start), "window_end": utc(c.window_end), "status": c.status,
            "fired": c.status == "fired", "messages": int(c.messages), "values": json_safe(c.values),
            "conditions": json_safe([_as_dict(o) for o in c.conditions]), "actions": json_safe(list(c.actions)),
            "state": json_safe(c.state), "recorded_at": now,
        } for c in checks]
        insert = DIALECT_INSERTS[self.dialect]
        inserted = 0
        with self.engine.begin() as conn:
            if rows:
                stmt = (insert(RuleCheck.__table__)
                        .on_conflict_do_nothing(index_elements=["definition", "version", "group_key", "window_start"])
                        .returning(RuleCheck.__table__.c.id))
                inserted = len(conn.execute(stmt, rows).all())
            if progress:
                table = RuleProgress.__table__
                stmt = insert(table)
                # Never move back: a replay after a restart reports offsets below what was reached.
                stmt = stmt.on_conflict_do_update(
                    index_elements=["consumer_group", "topic", "partition"],
                    set_={"offset": case((stmt.excluded["offset"] > table.c["offset"], stmt.excluded["offset"]),
                                         else_=table.c["offset"])})
                conn.execute(stmt, [{"consumer_group": consumer_group, "topic": t, "partition": int(p),
                                     "offset": int(o)} for (t, p), o in progress.items()])
        return inserted

    def progress(self, consumer_group: str) -> dict[tuple[str, int], int]:
        with Session(self.engine) as s:
            rows = s.scalars(select(RuleProgress).where(RuleProgress.consumer_group == consumer_group))
            return {(r.topic, r.partition): r.offset for r in rows}

    def latest_states(self, definition: str, version: str) -> dict[str, dict]:
        """group key -> its state after the latest check (by window start) of this version."""
        same = and_(RuleCheck.definition == definition, RuleCheck.version == version)
        latest = (select(RuleCheck.group_key, func.max(RuleCheck.window_start).label("start"))
                  .where(same).group_by(RuleCheck.group_key).subquery())
        query = select(RuleCheck.group_key, RuleCheck.state).where(same).join(
            latest, and_(RuleCheck.group_key == latest.c.group_key, RuleCheck.window_start == latest.c.start))
        with self.engine.connect() as conn:
            return {key: state for key, state in conn.execute(query)}

    def _checks(self, definition: str, group: str | None, newest_first: bool, limit: int | None = None):
        query = select(RuleCheck).where(RuleCheck.definition == definition)
        if group is not None:
            query = query.where(RuleCheck.group_key == group)
        order = (RuleCheck.window_start.desc(), RuleCheck.id.desc()) if newest_first else \
            (RuleCheck.window_start, RuleCheck.id)
        query = query.order_by(*order).limit(limit)
        with Session(self.engine) as s:
            return list(s.scalars(query))

    def recent(self, definition: str, limit: int = 50, group: str | None = None) -> list[dict]:
        """The latest checks, newest first, as dicts (datetimes UTC-aware)."""
        return [{
            "definition": r.definition, "version": r.version, "group": r.group_key, "topic": r.topic,
            "window_start": r.window_start, "window_end": r.window_end, "status": r.status, "fired": r.fired,
            "messages": r.messages, "values": r.values, "conditions": r.conditions, "actions": r.actions,
            "state": r.state, "recorded_at": r.recorded_at,
        } for r in self._checks(definition, group, newest_first=True, limit=limit)]

    def frame(self, definition: str, group: str | None = None) -> pd.DataFrame:
        """Checks oldest first, one row each: window_start, window_end, group, version, status,
        fired, messages, every aggregated value, and per condition i `cond{i}.type`, `.text`, `.metric`,
        `.value`, `.holds` and the numbers of its detail (`cond{i}.ema`, `.upper`, `.threshold`...)."""
        records = []
        for r in self._checks(definition, group, newest_first=False):
            row = {"window_start": r.window_start, "window_end": r.window_end, "group": r.group_key,
                   "version": r.version, "status": r.status, "fired": r.fired, "messages": r.messages}
            row.update(r.values or {})
            for cond in r.conditions or []:
                prefix = f"cond{cond['index']}"
                row |= {f"{prefix}.type": cond["type"], f"{prefix}.text": cond["text"], f"{prefix}.metric": cond["metric"],
                        f"{prefix}.value": cond["value"], f"{prefix}.holds": cond["holds"]}
                for key, v in (cond.get("detail") or {}).items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        row[f"{prefix}.{key}"] = v
            records.append(row)
        columns = ["window_start", "window_end", "group", "version", "status", "fired", "messages"]
        frame = pd.DataFrame.from_records(records, columns=None if records else columns)
        for col in ("window_start", "window_end"):
            frame[col] = pd.to_datetime(frame[col], utc=True)
        return frame

    def definitions(self) -> list[str]:
        with self.engine.connect() as conn:
            return list(conn.scalars(select(RuleCheck.definition).distinct().order_by(RuleCheck.definition)))

    def groups(self, definition: str) -> dict[str, int]:
        """group key -> number of checks, most checks first."""
        count = func.count(RuleCheck.id)
        query = (select(RuleCheck.group_key, count).where(RuleCheck.definition == definition)
                 .group_by(RuleCheck.group_key).order_by(count.desc(), RuleCheck.group_key))
        with self.engine.connect() as conn:
            return {key: n for key, n in conn.execute(query)}

    def close(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    # WAL: readers do not block the writer nor the other way round; busy_timeout: wait for a lock.
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()
