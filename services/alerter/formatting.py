"""Slack messages (text + Block Kit) for each kind of anomaly record."""

from __future__ import annotations

from datetime import datetime, timezone

from shared.records.kmeans import ClusterScoreRecord
from shared.records.logs import LogSessionRecord
from shared.records.metrics import ScoreRecord
from shared.records.rules import RuleFiringRecord

DETECTOR_LABELS = {"if_anomaly": "IsolationForest", "lstm_anomaly": "LSTM autoencoder"}
# What a person reads for an output name (others: the name with spaces).
OUTPUT_LABELS = {"value_likelihood": "value likelihood", "seasonal": "seasonal forecast",
                 "seasonal_likelihood": "seasonal forecast likelihood", "robust_zscore": "robust z-score",
                 "robust_zscore_likelihood": "robust z-score likelihood", "isolation_forest": "IsolationForest",
                 "lstm_autoencoder": "LSTM autoencoder", "contextual": "contextual (CAD OSE-like)",
                 "art": "adaptive resonance (ARTime-like)", "knn": "conformal kNN"}
ALARM_TAIL = 1e-5  # the likelihood stage's alarm threshold, as a tail probability


def output_label(name: str) -> str:
    return OUTPUT_LABELS.get(name, name.replace("_", " "))


def one_in(p: float) -> str:
    """A tail probability as a person reads it: 2.3e-7 -> '1 in 4,300,000'."""
    n = 1.0 / p
    digits = max(len(f"{n:.0f}") - 2, 0)  # two significant figures
    return f"1 in {round(n, -digits):,.0f}"


def _why_lines(rec: ScoreRecord) -> tuple[str, list[str]]:
    """(short reason for the text line, Block Kit fields) from the record's explanation."""
    why = rec.why
    if why is None:  # a record from before explanations, or a seed decision: what flagged, IF/LSTM scores
        fired = [name for name in rec.decision if rec.flags.get(name)] or [
            label for field, label in DETECTOR_LABELS.items() if getattr(rec, field)] or ["combined rule"]
        return f"{', '.join(fired)} fired", [
            f"*Fired*\n{', '.join(fired)}",
            f"*Scores*\nIF {rec.if_score:.3f} · LSTM error {rec.reconstruction_error:.3f}"]
    deciding = " + ".join(output_label(d) for d in why.deciding) or "combined rule"
    reason, fields = [f"{deciding} fired"], [f"*Decided by*\n{deciding}"]
    if why.tail_probability is not None:
        rare = one_in(why.tail_probability) + (" or rarer" if why.tail_probability <= 1e-10 else "")
        reason.append(f"{rare} unusual")
        fields.append(f"*How unusual*\n{rare} (alert at {one_in(ALARM_TAIL)})")
    if why.expected is not None:
        observed = "" if why.observed_what in (None, "value") else f"{why.observed_what} {why.observed:g}; "
        expected = f"{why.expected:g} (normal {why.expected_low:g} to {why.expected_high:g})"
        reason.append(f"expected {expected}")
        fields.append(f"*Expected*\n{observed}{expected}, by {output_label(why.expected_from or '')}")
    scores = " · ".join(f"{output_label(d)} {rec.scores[d]:.3g}" for d in why.deciding if d in rec.scores)
    if scores:
        fields.append(f"*Scores*\n{scores}")
    return "; ".join(reason), fields


def format_alert(rec: ScoreRecord) -> tuple[str, list[dict]]:
    ts = rec.timestamp.astimezone(timezone.utc) if rec.timestamp.tzinfo else rec.timestamp  # naive = UTC
    when = ts.strftime("%Y-%m-%d %H:%M:%S UTC")
    reason, why_fields = _why_lines(rec)
    text = f":rotating_light: Anomaly in {rec.series} at {when}: value {rec.value:g} ({reason})"
    blocks = [
        {"type": "header", "text": {"type": "plain_text", "text": f"Anomaly in {rec.series}"[:150]}},
        {"type": "section", "fields": [
            {"type": "mrkdwn", "text": f"*Time*\n{when}"},
            {"type": "mrkdwn", "text": f"*Value*\n{rec.value:g}"},
            *({"type": "mrkdwn", "text": f[:2000]} for f in why_fields),
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


def format_group(describe: str, firing: list, resolved: list, max_listed: int,
                 resolve_timeout_s: float) -> tuple[str, list[dict]]:
    """One message for a group's notification (Alertmanager's "[FIRING:3]"): its new alerts, one line
    per series (the latest, with how many came), and the series resolved; at most `max_listed` lines
    each, then how many more. A lone new alert keeps its own full message."""
    if len(firing) == 1 and not resolved and firing[0].text:
        return firing[0].text, firing[0].blocks
    latest: dict[str, list] = {}
    for alert in firing:
        latest.setdefault(alert.fingerprint, []).append(alert)
    counts = ([f"FIRING:{len(latest)}"] if latest else []) + ([f"RESOLVED:{len(resolved)}"] if resolved else [])
    icon = ":rotating_light:" if latest else ":white_check_mark:"
    title = f"[{', '.join(counts)}] {describe}"

    def listing(lines: list[str]) -> str:
        shown = lines[:max_listed]
        more = len(lines) - len(shown)
        return "\n".join(shown + ([f"… and {more} more"] if more else []))

    firing_lines = [f"• {alerts[-1].summary}" + (f" (×{len(alerts)})" if len(alerts) > 1 else "")
                    for alerts in latest.values()]
    resolved_lines = [f"• {a.labels.get('series', a.fingerprint)}" for a in resolved]
    parts = [f"{icon} {title}"]
    blocks: list[dict] = [{"type": "header", "text": {"type": "plain_text", "text": title[:150]}}]
    if firing_lines:
        parts.append(listing(firing_lines))
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": f"*Firing*\n{listing(firing_lines)}"[:3000]}})
    if resolved_lines:
        quiet = f"no anomaly for {resolve_timeout_s:g} s"
        parts.append(f"Resolved ({quiet}):\n{listing(resolved_lines)}")
        blocks.append({"type": "section", "text": {"type": "mrkdwn",
                                                   "text": f"*Resolved* ({quiet})\n{listing(resolved_lines)}"[:3000]}})
    return "\n".join(parts)[:3900], blocks
