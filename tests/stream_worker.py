"""A stream-core worker for the delivery tests: `Mapper` writes one output per input, and
`python stream_worker.py` runs it as its own process (so a test can kill -9 it mid-transaction).

Its output's value is the input's "<partition>:<offset>", so a reader can tell each input's outputs
apart: 0 lost, 0 duplicated means each appears exactly once."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from shared.stream import Output, Processor, Result, StreamLoop


def origin(msg) -> bytes:
    return f"{msg.partition()}:{msg.offset()}".encode()


class Mapper(Processor):
    """Each input -> one output on `out`. With `stall_after`, the checkpoint that comes after that
    many inputs were consumed writes `stalled` (a file) and hangs: its outputs were produced and
    acknowledged, its offsets are not committed yet. With `refuse_once`, the input at that offset
    first gets an output of `big` bytes (which a topic with a small max.message.bytes refuses)."""

    name = "mapper"

    def __init__(self, inputs: str, out: str, stall_after: int | None = None, stalled: str | None = None,
                 refuse_once: int | None = None, big: int = 0):
        self.inputs, self.out = inputs, out
        self.stall_after, self.stalled = stall_after, stalled
        self.refuse_once, self.big = refuse_once, big
        self.seen: list[bytes] = []  # every input processed, including those processed again
        self.assigned = self.revoked = 0
        self.loop: StreamLoop | None = None

    def attach(self, loop: StreamLoop) -> None:
        self.loop = loop

    def topics(self) -> list[str]:
        return [self.inputs]

    def process(self, messages: list, now: float) -> Result:
        result = Result()
        for m in messages:
            self.seen.append(origin(m))
            value = origin(m)
            if self.refuse_once is not None and m.offset() == self.refuse_once:
                self.refuse_once, value = None, os.urandom(self.big)  # incompressible (lz4)
            result.outputs.append(Output(self.out, value, m.key()))
        return result

    def checkpoint(self) -> None:
        if self.stall_after is not None and self.loop.stats["consumed"] >= self.stall_after:
            tmp = Path(self.stalled + ".tmp")  # renamed into place: the test never reads it half written
            tmp.write_text(json.dumps(self.loop.read_to and sorted(self.loop.read_to.items())))
            tmp.rename(self.stalled)
            while True:  # produced and acknowledged, not committed: the test kills the process here
                time.sleep(1)

    def on_assign(self, partitions) -> None:
        self.assigned += 1

    def on_revoke(self, partitions) -> None:
        self.revoked += 1


def main() -> int:
    from shared.app_logging import setup_logging
    from shared.config import load_settings
    from shared.signals import stop_on_signals

    settings = load_settings()
    log = setup_logging(settings, "mapper")
    env = os.environ
    processor = Mapper(env["MAPPER_IN"], env["MAPPER_OUT"],
                       stall_after=int(env["MAPPER_STALL_AFTER"]) if env.get("MAPPER_STALL_AFTER") else None,
                       stalled=env.get("MAPPER_STALLED"))
    loop = StreamLoop(settings, processor, env["MAPPER_GROUP"], log, instance_id=env["MAPPER_INSTANCE"])
    stop_on_signals(loop)
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
