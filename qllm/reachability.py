"""Whether an advisory dependency (predictor, kvmanager) answers, logged when that changes, not per call.

Services carry on without such a dependency (arrival order, local models, dropped samples); an operator
needs one line when it goes away and one when it is back, and a flapping one must not flood the log.
"""

from __future__ import annotations

from typing import Callable

import grpc


class Reachability:
    def __init__(self, log, name: str, address: str | None, without: str,
                 on_mark: Callable[[bool], None] | None = None):
        self.log = log
        self.name = name
        self.address = address
        self.without = without            # what the service does meanwhile, for the log line
        self.on_mark = on_mark            # called with every outcome (e.g. to set a gauge)
        self.down = False

    def mark(self, ok: bool, error: grpc.aio.AioRpcError | None = None) -> None:
        if ok and self.down:
            self.log.info(f"{self.name} reachable again", address=self.address)
        elif not ok and not self.down:
            self.log.warning(f"{self.name} unavailable; {self.without}", address=self.address,
                             code=error.code().name if error else None)
        self.down = not ok
        if self.on_mark is not None:
            self.on_mark(ok)
