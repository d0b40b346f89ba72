"""Detector definitions: rule conditions over aggregated metrics, one YAML file per definition.

A definition says what to read (topic, fields, group-by key, filter), how often to check
(`trigger_every`, in event time), which conditions must all hold, and what to do when they do.
Files are validated with pydantic; an invalid file is reported with the field and the line it is
on, and never stops the other definitions. `DefinitionFolder` keeps the folder's valid definitions
current while the rules service runs (watchdog tells it when a file changes).
"""

from __future__ import annotations

import hashlib
import re
import threading
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import orjson
import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: Any) -> float:
    """'30s', '1m', '5m', '1h', '1d', '250ms' or a number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError("a duration such as 30s, 5m or 1h")
    if isinstance(value, (int, float)):
        seconds = float(value)
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*", str(value))
        if not match:
            raise ValueError(f"{value!r} is not a duration such as 30s, 5m or 1h")
        seconds = float(match.group(1)) * _UNITS[match.group(2)]
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


Duration = Annotated[float, BeforeValidator(parse_duration)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


# ---------------------------------------------------------------- filter predicates

class FieldTest(_Strict):
    """One test on one message field; several tests on one field must all pass."""

    field: str = Field(min_length=1)
    equals: str | float | bool | None = None
    not_equals: str | float | bool | None = None
    in_: list[str | float | bool] | None = Field(None, alias="in")
    regex: str | None = None
    gt: float | None = None
    gte: float | None = None
    lt: float | None = None
    lte: float | None = None
    exists: bool | None = None

    @field_validator("regex")
    @classmethod
    def _compiles(cls, v):
        if v is not None:
            try:
                re.compile(v)
            except re.error as exc:
                raise ValueError(f"invalid regular expression: {exc}") from None
        return v

    @model_validator(mode="after")
    def _has_a_test(self):
        if not self.model_fields_set - {"field"}:
            raise ValueError("a field test needs one of equals, not_equals, in, regex, gt, gte, lt, lte, exists")
        return self


class AllOf(_Strict):
    and_: list["Predicate"] = Field(alias="and", min_length=1)


class AnyOf(_Strict):
    or_: list["Predicate"] = Field(alias="or", min_length=1)


class NoneOf(_Strict):
    not_: "Predicate" = Field(alias="not")


def _predicate_kind(v: Any) -> str | None:
    if isinstance(v, BaseModel):
        return {AllOf: "<and>", AnyOf: "<or>", NoneOf: "<not>", FieldTest: "<test>"}.get(type(v))
    if isinstance(v, dict):
        for key in ("and", "or", "not"):
            if key in v:
                return f"<{key}>"
        return "<test>"
    return None


# Tags are written <...> so that error locations can tell them from field names (see _node_at).
Predicate = Annotated[
    Union[Annotated[AllOf, Tag("<and>")], Annotated[AnyOf, Tag("<or>")], Annotated[NoneOf, Tag("<not>")],
          Annotated[FieldTest, Tag("<test>")]],
    Discriminator(_predicate_kind, custom_error_type="predicate",
                  custom_error_message="a predicate is {field: ..., <test>: ...}, {and: [...]}, {or: [...]} or {not: ...}"),
]
AllOf.model_rebuild()
AnyOf.model_rebuild()
NoneOf.model_rebuild()


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def compile_predicate(p: Predicate | None):
    """A predicate -> a function(record: dict) -> bool. A missing field fails every test but
    `exists: false`; a numeric test on a non-number fails."""
    if p is None:
        return lambda record: True
    if isinstance(p, AllOf):
        parts = [compile_predicate(q) for q in p.and_]
        return lambda record: all(f(record) for f in parts)
    if isinstance(p, AnyOf):
        parts = [compile_predicate(q) for q in p.or_]
        return lambda record: any(f(record) for f in parts)
    if isinstance(p, NoneOf):
        inner = compile_predicate(p.not_)
        return lambda record: not inner(record)
    tests = []
    if p.exists is not None:
        tests.append(lambda v, present, want=p.exists: present == want)
    if p.equals is not None:
        tests.append(lambda v, present, want=p.equals: present and v == want)
    if p.not_equals is not None:
        tests.append(lambda v, present, want=p.not_equals: present and v != want)
    if p.in_ is not None:
        tests.append(lambda v, present, want=tuple(p.in_): present and v in want)
    if p.regex is not None:
        pattern = re.compile(p.regex)
        tests.append(lambda v, present: present and isinstance(v, str) and pattern.search(v) is not None)
    for op, bound in (("gt", p.gt), ("gte", p.gte), ("lt", p.lt), ("lte", p.lte)):
        if bound is not None:
            cmp = {"gt": float.__gt__, "gte": float.__ge__, "lt": float.__lt__, "lte": float.__le__}[op]
            tests.append(lambda v, present, cmp=cmp, bound=bound:
                         present and _number(v) is not None and cmp(float(v), bound))
    name = p.field

    def check(record: dict) -> bool:
        present = name in record
        value = record.get(name)
        return all(t(value, present) for t in tests)

    return check


# ---------------------------------------------------------------- conditions

Aggregation = Literal["average", "min", "max", "sum", "count", "p95"]


class _Aggregated(_Strict):
    aggregation: Aggregation = "average"
    field: str | None = None

    @model_validator(mode="after")
    def _field_needed(self):
        if self.aggregation != "count" and not self.field:
            raise ValueError(f"field is required for aggregation {self.aggregation!r}")
        return self

    @property
    def metric(self) -> str:
        """The aggregated value's name, e.g. 'average(value)' or 'count'."""
        return "count" if self.aggregation == "count" else f"{self.aggregation}({self.field})"


class MetricCondition(_Aggregated):
    """`average of FIELD above VALUE for N times`: the last N checks all satisfy the comparison."""

    type: Literal["metric"]
    operator: Literal["above", "below", "equal"]
    value: float
    times: int = Field(1, ge=1, le=1000)

    def describe(self) -> str:
        times = f" for {self.times} times" if self.times > 1 else ""
        return f"{self.metric} {self.operator} {self.value:g}{times}"


class RateCondition(_Aggregated):
    """`average of FIELD increased by more than X% compared with the average of the previous N results`."""

    type: Literal["rate"]
    direction: Literal["increased", "decreased"]
    percent: float = Field(gt=0)
    compare_with: Literal["average", "min", "max"] = "average"
    previous: int = Field(ge=1, le=1000)

    def describe(self) -> str:
        return (f"{self.metric} {self.direction} by more than {self.percent:g}% compared with the "
                f"{self.compare_with} of the previous {self.previous} results")


class BollingerCondition(_Aggregated):
    """EMA over `points` checks of the aggregated metric; band = EMA ± k·σ (k is the sensitivity).
    The band comes from the checks before this one, so a spike cannot widen its own band."""

    type: Literal["bollinger"]
    points: int = Field(20, ge=2, le=10_000)
    k: float = Field(2.0, gt=0)
    band: Literal["upper", "lower", "both"] = "upper"

    def describe(self) -> str:
        where = {"upper": "above the upper", "lower": "below the lower", "both": "outside the"}[self.band]
        return f"{self.metric} {where} Bollinger band (EMA over {self.points} points ± {self.k:g}σ)"


class RatioCondition(_Strict):
    """Messages matching `query` (and the definition's filter) as a percent of those matching the filter."""

    type: Literal["ratio"]
    query: Predicate
    operator: Literal["above", "below"]
    percent: float = Field(ge=0, le=100)
    times: int = Field(1, ge=1, le=1000)

    @property
    def metric(self) -> str:
        return "ratio"

    def describe(self) -> str:
        times = f" for {self.times} times" if self.times > 1 else ""
        return f"ratio of matching messages {self.operator} {self.percent:g}%{times}"


Condition = Annotated[Union[MetricCondition, RateCondition, BollingerCondition, RatioCondition],
                      Field(discriminator="type")]


# ---------------------------------------------------------------- actions

class SlackAction(_Strict):
    """Posted by the alerter (which owns Slack delivery and its retries) to this channel."""

    type: Literal["slack"]
    channel: str = Field(min_length=1)


class WebhookAction(_Strict):
    type: Literal["webhook"]
    url: str = Field(pattern=r"^https?://")
    headers: dict[str, str] = {}
    timeout_s: float = Field(5.0, gt=0, le=60)


class KafkaAction(_Strict):
    type: Literal["kafka"]
    topic: str = Field(pattern=r"^[A-Za-z0-9._-]{1,249}$")


class LogAction(_Strict):
    type: Literal["log"]
    level: Literal["info", "warning", "error"] = "warning"


Action = Annotated[Union[SlackAction, WebhookAction, KafkaAction, LogAction], Field(discriminator="type")]


# ---------------------------------------------------------------- the definition

class Query(_Strict):
    topic: str = Field(pattern=r"^[A-Za-z0-9._-]{1,249}$")
    timestamp_field: str = "timestamp"
    group_by: list[str] = []  # one definition runs per distinct value (e.g. per series)

    @field_validator("group_by", mode="before")
    @classmethod
    def _one_or_many(cls, v):
        return [v] if isinstance(v, str) else v


class Definition(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
    description: str = ""
    environment: list[str] | None = None  # None: every environment
    enabled: bool = True
    trigger_every: Duration = Field(gt=0)
    allowed_lateness: Duration | None = None  # None: the service default
    no_data: Literal["ignore", "zero", "previous"] = "ignore"
    expire_after: int = Field(12, ge=1)  # consecutive no-data checks after which a group is dropped
    # While a group keeps firing, notify (anomalies + actions) again only this often, in event time;
    # every check is still recorded. 0: notify on every firing check.
    repeat_every: Duration = Field(4 * 3600.0, ge=0)
    query: Query
    filter: Predicate | None = None
    conditions: list[Condition] = Field(min_length=1)
    actions: list[Action] = []

    @field_validator("environment", mode="before")
    @classmethod
    def _env_list(cls, v):
        return [v] if isinstance(v, str) else v

    @property
    def version(self) -> str:
        """Changes whenever anything that affects the checks changes; stored with each check."""
        body = self.model_dump(mode="json", by_alias=True, exclude={"description", "actions", "enabled", "repeat_every"})
        return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).hexdigest()[:12]

    def runs_in(self, environment: str) -> bool:
        return self.enabled and (self.environment is None or environment in self.environment)


# ---------------------------------------------------------------- loading, with line numbers

class DefinitionError(ValueError):
    """An invalid definition file; the message names the file, the field and the line."""


_CONDITION_AND_ACTION_TAGS = {"metric", "rate", "bollinger", "ratio", "slack", "webhook", "kafka", "log"}


def _node_at(node: yaml.Node, loc: tuple) -> tuple[yaml.Node, str]:
    """The deepest YAML node along a pydantic error location, and the location without the union
    tags pydantic puts in it (a predicate's '<and>', a condition's 'metric')."""
    path = []
    for part in loc:
        if isinstance(part, str) and (part.startswith("<") or part in _CONDITION_AND_ACTION_TAGS):
            continue
        path.append(str(part))
        if isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if k.value == str(part)), None)
            if match is not None:  # else a missing key: report the parent mapping's line
                node = match
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
    return node, ".".join(path) or "definition"


def parse_definition(text: str, source: str = "<string>") -> Definition:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise DefinitionError(f"{where}: not valid YAML: {getattr(exc, 'problem', None) or exc}") from None
    if not isinstance(data, dict) or root is None:
        raise DefinitionError(f"{source}:1: a definition is a YAML mapping (name, trigger_every, query, conditions, ...)")
    try:
        return Definition.model_validate(data)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            node, path = _node_at(root, err["loc"])
            lines.append(f"{source}:{node.start_mark.line + 1}: {path}: {err['msg']}")
        raise DefinitionError("\n".join(lines)) from None


def load_definition_file(path: Path) -> Definition:
    try:
        text = path.read_text()
    except OSError as exc:
        raise DefinitionError(f"{path}: cannot read: {exc}") from None
    return parse_definition(text, str(path))


DEFINITION_SUFFIXES = (".yaml", ".yml")


class DefinitionFolder:
    """The valid definitions of a folder, kept current: `refresh()` re-reads files that changed.

    A file that turns invalid keeps its last valid version running (and the error is reported);
    a deleted file's definition stops. Two files defining one name: the first (by file name) wins.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.by_file: dict[Path, Definition] = {}
        self.errors: dict[Path, str] = {}
        self._stamps: dict[Path, tuple[float, int]] = {}
        self._dirty = threading.Event()
        self._dirty.set()
        self._observer = None

    def watch(self) -> None:
        """Mark the folder dirty on any file event (watchdog), so refresh() re-reads only then."""
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer

        folder = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event):
                folder._dirty.set()

        self.folder.mkdir(parents=True, exist_ok=True)
        self._observer = Observer()
        self._observer.schedule(Handler(), str(self.folder), recursive=False)
        self._observer.daemon = True
        self._observer.start()

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(5)

    def refresh(self, force: bool = False) -> tuple[set[str], list[str]]:
        """Re-read changed files. Returns (names whose definition changed, added or went away,
        new error messages)."""
        if not (force or self._dirty.is_set() or self._observer is None):
            return set(), []
        self._dirty.clear()
        before = self.definitions()
        files = sorted(p for p in self.folder.glob("*") if p.suffix in DEFINITION_SUFFIXES and p.is_file()) \
            if self.folder.is_dir() else []
        new_errors = []
        for gone in (set(self.by_file) | set(self.errors)) - set(files):
            self.by_file.pop(gone, None)
            self.errors.pop(gone, None)
            self._stamps.pop(gone, None)
        for path in files:
            try:
                st = path.stat()
            except FileNotFoundError:
                continue
            stamp = (st.st_mtime, st.st_size)
            if self._stamps.get(path) == stamp and not force:
                continue
            self._stamps[path] = stamp
            try:
                self.by_file[path] = load_definition_file(path)
                self.errors.pop(path, None)
            except DefinitionError as exc:
                if self.errors.get(path) != str(exc):
                    new_errors.append(str(exc))
                self.errors[path] = str(exc)
        after = self.definitions()
        for path, definition in self.by_file.items():
            owner = next(p for p, d in sorted(self.by_file.items()) if d.name == definition.name)
            if owner != path:
                msg = f"{path}:1: name: {definition.name!r} is already defined in {owner}; this file is ignored"
                if self.errors.get(path) != msg:
                    new_errors.append(msg)
                self.errors[path] = msg
        changed = {n for n in set(before) | set(after)
                   if n not in before or n not in after or before[n] != after[n]}
        return changed, new_errors

    def definitions(self) -> dict[str, Definition]:
        out: dict[str, Definition] = {}
        for _path, definition in sorted(self.by_file.items()):
            out.setdefault(definition.name, definition)
        return out
