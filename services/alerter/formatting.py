"""Slack messages (text + Block Kit) for each kind of anomaly record."""

from __future__ import annotations

from datetime import datetime, timezone

from shared.records.kmeans import ClusterScoreRecord
from shared.records.logs import LogSessionRecord
from shared.records.metrics import ScoreRecord
from shared.records.rules import RuleFiringRecord

DETECTOR_LABELS = {"if_anomaly": "IsolationForest", "lstm_anomaly": "LSTM autoencoder"}


def format_alert(rec: ScoreRecord) -> tuple[str, list[dict]]:
    fired = [name for name in rec.decision if rec.flags.get(name)] or [
        label for field, label in DETECTOR_LABELS.items() if getattr(rec, field)] or ["combined rule"]
    ts = rec.timestamp.astimezone(timezone.utc) if rec.timestamp.tzinfo else rec.timestamp  # naive = UTC
    when = ts.strftime("%Y-%m-%d %H:%M:%S UTC")
    text = (f":rotating_light: Anomaly in {rec.series} at {when}: value {rec.value:g} "
            f"({', '.join(fired)} fired)")
    blocks = [
        {"type": "header", "text": {"type": "plain_text", "text": f"Anomaly in {rec.series}"[:150]}},
        {"type": "section", "fields": [
            {"type": "mrkdwn", "text": f"*Time*\n{when}"},
            {"type": "mrkdwn", "text": f"*Value*\n{rec.value:g}"},
            {"type": "mrkdwn", "text": f"*Fired*\n{', '.join(fired)}"},
            {"type": "mrkdwn", "text": f"*Scores*\nIF {rec.if_score:.3f} · LSTM error {rec.reconstruction_error:.3f}"},
        ]},
        {"type": "context", "elements": [{"type": "mrkdwn", "text":
            f"model {rec.model_version} · {rec.source_topic}[{rec.source_partition}]@{rec.source_offset}"}]},
    ]
    return text, blocks


def as_utc(ts: datetime) -> datetime:
    return ts.astimezone(timezone.utc) if ts.tzinfo else ts.replace(tzinfo=timezone.utc)  # naive = UTC


def format_window(start: datetime, end: datetime) -> str:
    """'2014-02-14 14:00–14:15 UTC'; seconds only when a bound has them, the end's date only when it differs."""
    start, end = as_utc(start), as_utc(end)
    clock = "%H:%M:%S" if start.second or end.second else "%H:%M"
    end_fmt = clock if end.date() == start.date() else f"%Y-%m-%d {clock}"
    return f"{start.strftime(f'%Y-%m-%d {clock}')}–{end.strftime(end_fmt)} UTC"


def _condition_clause(text: str, metric: str, value: float | None) -> str:
    """'average(value) above 80 for 3 times' with 85.2 -> 'average(value) 85.2 above 80 for 3 times'."""
    if value is None:
        return f"{text} (no value)"
    if text.startswith(metric + " "):
        return f"{metric} {value:g}{text[len(metric):]}"
    return f"{text} ({value:g})"  # e.g. a ratio, whose text does not start with its metric name


def format_rule_alert(rec: RuleFiringRecord) -> tuple[str, list[dict]]:
    window = format_window(rec.window_start, rec.window_end)
    clauses = [_condition_clause(c.text, c.metric, c.value) for c in rec.conditions]
    text = f":rotating_light: Rule {rec.definition} fired for {rec.series} (window {window}): {'; '.join(clauses)}"
    fields = [{"type": "mrkdwn", "text": f"*Group*\n{rec.series}"},
              {"type": "mrkdwn", "text": f"*Window*\n{window}"}]
    for c in rec.conditions:
        value = "no value" if c.value is None else f"{c.value:g}"
        fields.append({"type": "mrkdwn", "text": f"*{c.text}*\n{value} {'✓' if c.holds else '✗'}"[:2000]})
    context = f"definition version {rec.version} · {rec.source_topic} · {rec.environment}"
    if rec.description:
        context += f" · {rec.description}"
    blocks = [{"type": "header", "text": {"type": "plain_text", "text": f"Rule {rec.definition} fired"[:150]}}]
    # Slack takes at most 10 fields per section.
    blocks += [{"type": "section", "fields": fields[i:i + 10]} for i in range(0, len(fields), 10)]
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": context[:2000]}]})
    return text, blocks


def format_cluster_alert(rec: ClusterScoreRecord) -> tuple[str, list[dict]]:
    when = as_utc(rec.timestamp).strftime("%Y-%m-%d %H:%M:%S UTC")
    moved = ", ".join(f"{name} {'+' if d >= 0 else ''}{d:g}σ ({rec.metrics.get(name, 0.0):g}/s)"
                      for name, d in rec.deviations.items())
    text = (f":rotating_light: Broker metrics anomaly at {when} ({rec.series}): distance {rec.score:.3g} "
            f"> {rec.threshold:.3g} from the nearest cluster; furthest: {moved}")
    blocks = [
        {"type": "header", "text": {"type": "plain_text", "text": "Kafka broker metrics anomaly"}},
        {"type": "section", "fields": [
            {"type": "mrkdwn", "text": f"*Time*\n{when}"},
            {"type": "mrkdwn", "text": f"*Source*\n{rec.series}"[:2000]},
            {"type": "mrkdwn", "text": f"*Distance*\n{rec.score:.3g} (threshold {rec.threshold:.3g})"},
            {"type": "mrkdwn", "text": f"*Furthest metrics*\n{moved}"[:2000]},
        ]},
        {"type": "context", "elements": [{"type": "mrkdwn", "text":
            f"Real-Time K-Means {rec.model_version} · cluster {rec.nearest_cluster} · "
            f"{rec.source_topic}[{rec.source_partition}]@{rec.source_offset}"}]},
    ]
    return text, blocks


def format_log_alert(rec: LogSessionRecord) -> tuple[str, list[dict]]:
    when = as_utc(rec.timestamp).strftime("%Y-%m-%d %H:%M:%S UTC")
    what = "session ended" if rec.event == "<END>" else f"event {rec.event} `{rec.template}`"
    text = f":rotating_light: Log anomaly in session {rec.series} at {when}: {what}: {rec.reason}"
    before = " → ".join(rec.window) or "(session start)"
    fields = [
        {"type": "mrkdwn", "text": f"*Session*\n{rec.series}"[:2000]},
        {"type": "mrkdwn", "text": f"*Time*\n{when}"},
        {"type": "mrkdwn", "text": f"*Unexpected*\n{what}"[:2000]},
        {"type": "mrkdwn", "text": f"*Why*\n{rec.reason}"[:2000]},
        {"type": "mrkdwn", "text": f"*Events before it*\n{before}"[:2000]},
    ]
    blocks = [{"type": "header", "text": {"type": "plain_text", "text": f"Log anomaly in {rec.series}"[:150]}},
              {"type": "section", "fields": fields}]
    if rec.line:
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": f"```{rec.line[:2900]}```"}})
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text":
        f"next-event model {rec.model_version} · k={rec.k} · {rec.session_events} events so far · "
        f"{rec.source_topic}[{rec.source_partition}]@{rec.source_offset}"}]})
    return text, blocks
