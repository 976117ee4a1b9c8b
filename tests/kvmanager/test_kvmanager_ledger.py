from kvmanager.ledger import Ledger


def test_pin_list_expire():
    ledger = Ledger()
    ledger.pin("a", "w0", 100, ttl_s=2.0, now=0.0)
    ledger.pin("b", "w1", 50, ttl_s=1.0, now=0.5)
    assert [e.program_id for e in ledger.list(now=1.0)] == ["b", "a"]  # soonest expiry first
    assert [e.program_id for e in ledger.list(now=1.0, worker="w0")] == ["a"]
    assert ledger.pinned_tokens() == 150 and ledger.pinned_tokens("w1") == 50
    gone = ledger.expire(now=1.5)
    assert [e.program_id for e in gone] == ["b"]
    assert ledger.pinned_tokens("w1") == 0
    assert ledger.get("a", now=1.9) is not None
    assert ledger.get("a", now=2.0) is None  # expires_at <= now is expired
    assert len(ledger) == 0 and ledger.pinned_tokens() == 0


def test_new_pin_replaces_previous_one():
    ledger = Ledger()
    ledger.pin("a", "w0", 100, 2.0, now=0.0)
    entry = ledger.pin("a", "w1", 300, 2.0, now=1.0, turn_index=2, tool_name="ls")
    assert entry.worker == "w1" and entry.expires_at == 3.0
    assert ledger.pinned_tokens("w0") == 0 and ledger.pinned_tokens("w1") == 300
    assert len(ledger) == 1


def test_budget_refuses_pins_over_it():
    ledger = Ledger(max_tokens_per_worker=250)
    assert ledger.pin("a", "w0", 200, 2.0, now=0.0)
    assert ledger.pin("b", "w0", 100, 2.0, now=0.0) is None
    assert ledger.pin("b", "w1", 100, 2.0, now=0.0)
    assert ledger.pin("a", "w0", 250, 2.0, now=0.0)  # replacing its own pin frees its tokens first
    assert ledger.pin("c", "w0", 1, 2.0, now=3.0)  # after expiry there is room again


def test_release_and_last_turn():
    ledger = Ledger()
    ledger.pin("a", "w0", 10, 2.0, now=0.0)
    assert ledger.release("a").program_id == "a"
    assert ledger.release("a") is None
    ledger.pin("a", "w0", 10, 2.0, now=0.0)
    assert ledger.turn_ended("a", "ls", last_turn=False, now=0.0, turn_index=0) is None
    prev = ledger.turn_ended("a", "cat", last_turn=False, now=1.0, turn_index=1)
    assert (prev.tool, prev.turn_index) == ("ls", 0)
    assert ledger.turn_ended("a", "", last_turn=True, now=2.0, turn_index=2).tool == "cat"
    assert ledger.programs() == 0
    assert ledger.release("a").program_id == "a"  # the manager drops the pin, the ledger only counts


def test_idle_programs_are_forgotten():
    ledger = Ledger(program_idle_s=10.0, max_programs=2)
    ledger.turn_ended("a", "ls", False, now=0.0)
    ledger.turn_ended("b", "ls", False, now=5.0)
    ledger.expire(now=12.0)
    assert ledger.programs() == 1
    assert [p.tool for p in ledger.take_abandoned()] == ["ls"] and ledger.take_abandoned() == []
    ledger.turn_ended("c", "ls", False, now=12.0)
    ledger.turn_ended("d", "ls", False, now=12.0)
    assert ledger.programs() == 2


def test_learned_budgets_and_release_by_seq():
    ledger = Ledger()
    assert ledger.budget("w0") == 0 and ledger.fits("w0", 10**9)
    ledger.learned_budgets["w0"] = 100
    assert ledger.fits("w0", 100) and not ledger.fits("w0", 101)
    first = ledger.pin("a", "w0", 80, 2.0, now=0.0)
    assert ledger.fits("w0", 100, program_id="a")  # its own pin would be replaced
    assert ledger.pin("b", "w0", 30, 2.0, now=0.0) is None
    assert ledger.pin("b", "w0", 30, 2.0, now=0.0, enforce_budget=False) is not None
    second = ledger.pin("a", "w0", 50, 2.0, now=1.0)
    assert second.seq != first.seq
    assert ledger.release("a", seq=first.seq) is None and ledger.release("a", seq=second.seq) == second
    assert Ledger(max_tokens_per_worker=7).budget("w0") == 7
