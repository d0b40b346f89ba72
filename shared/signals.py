"""Graceful stop: SIGTERM (docker stop, the supervisor) and SIGINT (Ctrl-C) both mean "finish the
current batch, make it durable, commit, exit"."""

from __future__ import annotations

import signal
from collections.abc import Callable


def on_stop_signal(stop: Callable[[], None]) -> None:
    """Call `stop()` on SIGTERM or SIGINT; the caller's loop checks for it between batches."""

    def on_signal(_sig, _frame):
        stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)


def stop_on_signals(service) -> None:
    """Set `service.stopping` on SIGTERM or SIGINT."""
    on_stop_signal(lambda: setattr(service, "stopping", True))
