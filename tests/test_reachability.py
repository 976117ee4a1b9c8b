"""A dependency going down is logged once and coming back once, whatever the number of calls."""

from qllm.reachability import Reachability


class FakeLog:
    def __init__(self):
        self.lines = []

    def info(self, event, **kw):
        self.lines.append(("info", event))

    def warning(self, event, **kw):
        self.lines.append(("warning", event))


def test_logs_each_change_once_and_reports_every_outcome():
    log, seen = FakeLog(), []
    r = Reachability(log, "predictor", "h:1", "arrival order", on_mark=seen.append)
    for ok in (True, False, False, False, True, True, False):
        r.mark(ok)
    assert log.lines == [("warning", "predictor unavailable; arrival order"), ("info", "predictor reachable again"),
                         ("warning", "predictor unavailable; arrival order")]
    assert seen == [True, False, False, False, True, True, False] and r.down
