"""Graceful stop of a consumer service: SIGTERM (docker stop, the supervisor) and SIGINT (Ctrl-C)
both mean "finish the current batch, make it durable, commit, exit"."""

from __future__ import annotations

import signal


def stop_on_signals(service) -> None:
    """Set `service.stopping` on SIGTERM or SIGINT; its run loop checks it between batches."""

    def on_signal(_sig, _frame):
        service.stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
