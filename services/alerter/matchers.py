"""Alertmanager's label matchers, for silences and routes: `name=value`, `name!=value`,
`name=~regex`, `name!~regex` (the value may be double-quoted). A regex matches the whole value
(anchored, as in Alertmanager) and a label the alert does not have matches as the empty string.

The labels of an anomaly record (`alert_labels`): `series`, `kind` (metric, rule, cluster, log),
`definition` (the rule's name, or the model set's for a metric anomaly), and any `labels` or
`severity` the record carries.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from shared.records.metrics import series_labels

_MATCHER = re.compile(r'^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*(.*?)\s*$')
KIND_LABELS = {"score": "metric"}  # a record's kind as a person names it


@dataclass(frozen=True)
class Matcher:
    name: str
    op: str  # "=", "!=", "=~", "!~"
    value: str

    @classmethod
    def parse(cls, text: str) -> Matcher:
        m = _MATCHER.match(text)
        if m is None:
            raise ValueError(f"not a matcher: {text!r} (name=value, name!=value, name=~regex or name!~regex)")
        name, op, value = m.groups()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1].replace('\\"', '"')
        matcher = cls(name, op, value)
        if op in ("=~", "!~"):
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"bad regex in {text!r}: {exc}") from None
        return matcher

    def matches(self, labels: dict[str, str]) -> bool:
        have = labels.get(self.name, "")
        if self.op == "=":
            return have == self.value
        if self.op == "!=":
            return have != self.value
        hit = re.fullmatch(self.value, have) is not None
        return hit if self.op == "=~" else not hit

    def __str__(self) -> str:
        return f'{self.name}{self.op}"{self.value}"'


def parse_all(texts: list[str]) -> list[Matcher]:
    return [Matcher.parse(t) for t in texts]


def match_all(matchers: list[Matcher], labels: dict[str, str]) -> bool:
    return all(m.matches(labels) for m in matchers)


def alert_labels(rec) -> dict[str, str]:
    """The labels an anomaly record is matched, routed and grouped by (a metric's include those of
    its series identity, shared.records.metrics.series_labels)."""
    kind = KIND_LABELS.get(rec.kind, rec.kind)
    if rec.kind == "rule":
        definition = rec.definition
    elif rec.kind == "score":
        definition = rec.model_version.split("-", 1)[0]  # the model set: "ec2_cpu-2024...-abc" -> "ec2_cpu"
    elif rec.kind == "cluster":
        definition = "kmeans"
    else:
        definition = "next-event"
    labels = {str(k): str(v) for k, v in (getattr(rec, "labels", None) or {}).items()}
    if rec.kind == "score":  # a labelled series, cpu{host="a"}: its metric and labels are matchable too
        metric, series_labels_ = series_labels(rec.series)
        if series_labels_:
            labels |= series_labels_ | {"metric": metric}
    severity = getattr(rec, "severity", None)
    if severity:
        labels["severity"] = str(severity)
    return labels | {"series": rec.series, "kind": kind, "definition": definition}
