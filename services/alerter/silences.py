"""Silences, as in Alertmanager: matchers and an expiry, kept in a file (YAML or JSON, by its
suffix; `alert_silences_file`) that the alerter re-reads when it changes, and edited with
`anomstream silence add|list|expire`. An anomaly whose labels every matcher of an active silence
matches (starts_at <= now < ends_at) is not posted: it is counted and logged.

The file: `{"silences": [{"id", "matchers": ['series=~"host-.*"', ...], "starts_at", "ends_at",
"created_by", "comment"}]}` with ISO 8601 times.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import click
import yaml

from services.alerter.matchers import Matcher, match_all
from shared.cli import CONTEXT, run_command
from shared.config import load_settings


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _epoch(text) -> float:
    if isinstance(text, datetime):
        dt = text
    else:
        dt = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()


@dataclass
class Silence:
    id: str
    matchers: list[str]
    starts_at: float
    ends_at: float
    created_by: str = ""
    comment: str = ""

    def __post_init__(self) -> None:
        if not self.matchers:
            raise ValueError(f"silence {self.id}: at least one matcher")
        self.parsed = [Matcher.parse(m) for m in self.matchers]

    def active(self, now: float) -> bool:
        return self.starts_at <= now < self.ends_at

    def silences(self, labels: dict[str, str], now: float) -> bool:
        return self.active(now) and match_all(self.parsed, labels)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("parsed", None)
        return d | {"starts_at": _iso(self.starts_at), "ends_at": _iso(self.ends_at)}

    @classmethod
    def from_dict(cls, d: dict) -> Silence:
        return cls(str(d["id"]), [str(m) for m in d["matchers"]], _epoch(d["starts_at"]), _epoch(d["ends_at"]),
                   str(d.get("created_by", "")), str(d.get("comment", "")))


def read_silences(path: Path) -> list[Silence]:
    if not path.exists():
        return []
    data = yaml.safe_load(path.read_text()) or {}  # YAML reads JSON too
    return [Silence.from_dict(d) for d in (data.get("silences") or [])]


def write_silences(path: Path, silences: list[Silence]) -> None:
    """Atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"silences": [s.to_dict() for s in silences]}
    text = json.dumps(data, indent=2) if path.suffix == ".json" else yaml.safe_dump(data, sort_keys=False)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Silencer:
    """The silences file as the alerter sees it: re-read when its modification time or size changes;
    a file that does not parse keeps the silences read before (and is logged)."""

    def __init__(self, path: Path | None, log, clock=time.time):
        self.path, self.log, self.clock = path, log, clock
        self.silences: list[Silence] = []
        self.seen: tuple | None = None

    def refresh(self) -> None:
        if self.path is None:
            return
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp == self.seen:
            return
        self.seen = stamp
        try:
            self.silences = read_silences(self.path)
        except Exception as exc:  # a half-edited file: keep what was in force
            self.log.error("silences file not read; the previous silences stay in force", path=str(self.path),
                           error=str(exc))
            return
        now = self.clock()
        self.log.info("silences read", path=str(self.path), active=sum(s.active(now) for s in self.silences))

    def silenced_by(self, labels: dict[str, str]) -> Silence | None:
        now = self.clock()
        return next((s for s in self.silences if s.silences(labels, now)), None)


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """'90s', '15m', '2h', '1d', '1h30m'."""
    total, number = 0.0, ""
    for ch in text.strip():
        if ch.isdigit() or ch == ".":
            number += ch
        elif ch in DURATION_UNITS and number:
            total, number = total + float(number) * DURATION_UNITS[ch], ""
        else:
            raise click.BadParameter(f"{text!r}: a duration like 90s, 15m, 2h, 1d or 1h30m")
    if number or total <= 0:
        raise click.BadParameter(f"{text!r}: a duration like 90s, 15m, 2h, 1d or 1h30m")
    return total


def silences_file(settings) -> Path:
    """The alerter and the command read the same file: alert_silences_file, else <home>/silences.yaml."""
    return settings.alert_silences_file or settings.home / "silences.yaml"


def silences_path() -> Path:
    return silences_file(load_settings())


@click.group("silence", context_settings=CONTEXT)
def command() -> None:
    """Silences of the alerter (Alertmanager-style): matched anomalies are not posted until the
    silence expires. The file is ANOMSTREAM_ALERT_SILENCES_FILE (default <home>/silences.yaml);
    the running alerter re-reads it when it changes."""


@command.command("add")
@click.option("--match", "matchers", multiple=True, required=True,
              help='label matcher: series=~"host-.*", kind=metric, definition!=cpu-high (repeatable; all must hold)')
@click.option("--for", "duration", default="2h", show_default=True, help="how long: 90s, 15m, 2h, 1d")
@click.option("--comment", default="", help="why")
@click.option("--created-by", default=lambda: os.environ.get("USER", ""), help="who")
def add(matchers: tuple[str, ...], duration: str, comment: str, created_by: str) -> None:
    try:
        [Matcher.parse(m) for m in matchers]
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--match") from None
    now = time.time()
    path = silences_path()
    silence = Silence(uuid.uuid4().hex[:12], list(matchers), now, now + parse_duration(duration), created_by, comment)
    write_silences(path, read_silences(path) + [silence])
    click.echo(f"{silence.id}  until {_iso(silence.ends_at)}  {' '.join(matchers)}")


@command.command("list")
@click.option("--all", "show_all", is_flag=True, help="expired ones too")
def list_(show_all: bool) -> None:
    now = time.time()
    for s in read_silences(silences_path()):
        if show_all or s.ends_at > now:
            state = "active" if s.active(now) else ("expired" if s.ends_at <= now else "pending")
            click.echo(f"{s.id}  {state:8} until {_iso(s.ends_at)}  {' '.join(s.matchers)}"
                       + (f"  # {s.comment}" if s.comment else ""))


@command.command("expire")
@click.argument("silence_id")
def expire(silence_id: str) -> None:
    path = silences_path()
    silences = read_silences(path)
    hits = [s for s in silences if s.id == silence_id]
    if not hits:
        raise click.ClickException(f"no silence {silence_id} in {path}")
    now = time.time()
    for s in hits:
        s.ends_at = min(s.ends_at, now)
        s.starts_at = min(s.starts_at, now)
    write_silences(path, silences)
    click.echo(f"{silence_id} expired")


def main(argv: list[str] | None = None) -> int:
    return run_command(command, argv, "anomstream silence")


if __name__ == "__main__":
    sys.exit(main())
