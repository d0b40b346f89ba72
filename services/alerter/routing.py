"""Routes: which Slack channel an anomaly goes to, from its labels (services.alerter.matchers).

`alert_routes` is a list of `{"match": {"label": "value", ...}, "matchers": ["label=~regex", ...],
"channel": "#ops"}`; the first route whose `match` (equality) and `matchers` all hold wins; no
route matching: `slack_channel`. A rule firing whose definition names channels goes to those
(the definition is the more specific choice), not through the routes.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.alerter.matchers import Matcher, match_all


@dataclass(frozen=True)
class Route:
    matchers: tuple[Matcher, ...]
    channel: str

    @classmethod
    def parse(cls, raw: dict) -> Route:
        unknown = set(raw) - {"match", "matchers", "channel"}
        if unknown or not isinstance(raw.get("channel"), str) or not raw["channel"]:
            raise ValueError(f"a route is {{match: {{label: value}}, matchers: [...], channel: '#name'}}; "
                             f"got {raw!r}")
        matchers = [Matcher(str(k), "=", str(v)) for k, v in (raw.get("match") or {}).items()]
        matchers += [Matcher.parse(t) for t in raw.get("matchers") or []]
        return cls(tuple(matchers), raw["channel"])


class Router:
    def __init__(self, routes: list[dict], default: str):
        self.routes = [Route.parse(r) for r in routes]
        self.default = default

    def channel(self, labels: dict[str, str]) -> str:
        for route in self.routes:
            if match_all(list(route.matchers), labels):
                return route.channel
        return self.default

    def channels(self, labels: dict[str, str], named: list[str]) -> list[str]:
        """A rule's own channels if it names any, else the route's."""
        return list(dict.fromkeys(named)) or [self.channel(labels)]
