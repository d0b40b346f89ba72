"""A small PNG of a series' recent points with its anomalies marked, for a Slack message
(matplotlib's Agg backend: no display). The anomaly records carry no history, so the points are
the ones the alerter itself read for that series (`Recent`: a bounded ring per series)."""

from __future__ import annotations

import io
from collections import OrderedDict, deque

MAX_SERIES = 10_000  # series whose recent points are kept; beyond it the least recently seen go
MAX_IN_ONE_CHART = 3  # series drawn in one PNG (a group lists more)


class Recent:
    """series -> its last `points` (epoch s, value, is_anomaly), at most MAX_SERIES series."""

    def __init__(self, points: int, max_series: int = MAX_SERIES):
        self.points, self.max_series = points, max_series
        self.rings: OrderedDict[str, deque] = OrderedDict()

    def add(self, series: str, ts: float, value: float, anomaly: bool = True) -> None:
        if self.points <= 0:
            return
        ring = self.rings.pop(series, None)
        if ring is None:
            ring = deque(maxlen=self.points)
        if not any(p[0] == ts for p in ring):  # a record read again after a restart is not a new point
            ring.append((ts, value, anomaly))
        self.rings[series] = ring
        while len(self.rings) > self.max_series:
            self.rings.popitem(last=False)

    def of(self, series: str) -> list[tuple[float, float, bool]]:
        return sorted(self.rings.get(series, ()))


def render_png(series_points: dict[str, list[tuple[float, float, bool]]]) -> bytes:
    """One small panel per series (at most MAX_IN_ONE_CHART): its points as a line, anomalies in red."""
    import matplotlib

    matplotlib.use("Agg")
    from datetime import datetime, timezone

    import matplotlib.pyplot as plt

    items = [(s, pts) for s, pts in series_points.items() if pts][:MAX_IN_ONE_CHART]
    fig, axes = plt.subplots(len(items), 1, figsize=(5, 1.6 * len(items)), dpi=80, squeeze=False)
    try:
        for ax, (series, pts) in zip(axes[:, 0], items):
            when = [datetime.fromtimestamp(t, timezone.utc) for t, _, _ in pts]
            ax.plot(when, [v for _, v, _ in pts], color="#4a6fa5", linewidth=1, marker=".", markersize=3)
            bad = [(w, v) for w, (_, v, a) in zip(when, pts) if a]
            if bad:
                ax.scatter([w for w, _ in bad], [v for _, v in bad], color="#d62728", s=24, zorder=3,
                           label="anomaly")
            ax.set_title(series[:60], fontsize=8)
            ax.tick_params(labelsize=6)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        return buf.getvalue()
    finally:
        plt.close(fig)
