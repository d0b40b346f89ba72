"""Any record that can sit on `anomalies`, told apart by its `kind`."""

from __future__ import annotations

from typing import Annotated, Union

from pydantic import Discriminator, Tag, TypeAdapter

from shared.records.kmeans import ClusterScoreRecord
from shared.records.logs import LogSessionRecord
from shared.records.metrics import ScoreRecord
from shared.records.rules import RuleFiringRecord


def _record_kind(v) -> str | None:
    """The `kind` of an anomalies record; records written before rule firings existed have none."""
    if isinstance(v, dict):
        return v.get("kind", "score")
    return getattr(v, "kind", None)


# Any record that can sit on `anomalies`, told apart by `kind` (missing = "score").
AnomalyRecord = Annotated[
    Union[Annotated[ScoreRecord, Tag("score")], Annotated[RuleFiringRecord, Tag("rule")],
          Annotated[ClusterScoreRecord, Tag("cluster")], Annotated[LogSessionRecord, Tag("log")]],
    Discriminator(_record_kind, custom_error_type="anomaly_kind",
                  custom_error_message="an anomaly record is a JSON object whose kind is 'score' (the default), "
                                       "'rule', 'cluster' or 'log'"),
]
anomaly_record_adapter: TypeAdapter[ScoreRecord | RuleFiringRecord | ClusterScoreRecord | LogSessionRecord] = \
    TypeAdapter(AnomalyRecord)
