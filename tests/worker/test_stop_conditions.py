"""Stop strings over streamed text and stop tokens in the engine's request, without torch (the tokenizer
only for the detokenizing cases)."""

import pytest
from hypothesis import given, settings, strategies as st

from worker.outputs import ModelRunnerOutput
from worker.kv_blocks import BlockAllocator
from worker.request import FinishReason, Request, SamplingParams
from worker.scheduler import SchedulerConfig, make_scheduler
from worker.stop_strings import StopStrings


def stream(stop, pieces):
    """Pushes the pieces (the last as final) until a match; returns (sent text, match, pieces consumed)."""
    matcher = StopStrings(stop)
    sent = []
    for i, piece in enumerate(pieces):
        text, matched = matcher.push(piece, final=i == len(pieces) - 1)
        sent.append(text)
        if matched is not None:
            return "".join(sent), matched, i + 1
    return "".join(sent), None, len(pieces)


def test_match_split_across_pieces_is_cut_and_never_sent():
    sent, matched, used = stream(["world"], ["hel", "lo wo", "r", "ld and more", "unused"])
    assert (sent, matched, used) == ("hello ", "world", 4)


def test_the_last_characters_that_could_start_a_match_are_held_back():
    matcher = StopStrings(["STOP"])   # as vLLM: a fixed window of len("STOP") - 1 characters
    assert matcher.push("abcST") == ("ab", None)
    assert matcher.push("x") == ("c", None)
    assert matcher.push("", final=True) == ("STx", None)


def test_earliest_match_wins_then_list_order():
    assert stream(["lo", "hel"], ["hello"])[:2] == ("", "hel")
    assert stream(["ab", "abc"], ["xxabc"])[:2] == ("xx", "ab")
    assert stream(["abc", "ab"], ["xxabc"])[:2] == ("xx", "abc")


def test_single_character_stop_holds_nothing_back():
    matcher = StopStrings(["\n"])
    assert matcher.push("one") == ("one", None)
    assert matcher.push(" two\nthree") == (" two", "\n")


def test_no_match_releases_everything_at_the_end():
    assert stream(["zzz"], ["ab", "cz", "z"]) == ("abczz", None, 3)


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="abcxy \n", max_size=60),
       stop=st.lists(st.text(alphabet="abcx\n", min_size=1, max_size=5), min_size=1, max_size=4),
       cuts=st.lists(st.integers(0, 60), max_size=12))
def test_any_split_gives_the_text_before_the_first_match(text, stop, cuts):
    """The stop string that completes first as the text arrives ends it (generation stops there, so a longer
    one that would have completed later never does); among those completing in the same piece, the earliest."""
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])] or [""]
    expected = (text, None)
    for end in bounds[1:]:
        found = [(text.find(s, 0, end), i) for i, s in enumerate(stop) if text.find(s, 0, end) != -1]
        if found:
            at, i = min(found)
            expected = (text[:at], stop[i])
            break
    assert stream(stop, pieces)[:2] == expected


# --- stop tokens --------------------------------------------------------------------------------------------
def test_stop_token_finishes_whatever_ignore_eos_says():
    r = Request("r", [1, 2], SamplingParams(max_tokens=10, ignore_eos=True, stop_token_ids=frozenset({42})),
                eos_token_ids=frozenset({0}))
    for token in (5, 0, 42):
        r.append_token(token)
    assert r.output_token_ids == [5, 0, 42]
    assert r.finish_reason is FinishReason.STOP and r.stop_token_id == 42


def test_eos_before_stop_tokens():
    r = Request("r", [1], SamplingParams(max_tokens=10, stop_token_ids=frozenset({0})), eos_token_ids=frozenset({0}))
    r.append_token(0)
    assert r.finish_reason is FinishReason.STOP and r.stop_token_id is None   # the model's own end


# --- a stop string found outside the core ends the request in the scheduler -----------------------------------
def make(blocks=64, block_size=4):
    return make_scheduler("qllm", SchedulerConfig(), BlockAllocator(blocks, block_size))


def test_stop_ends_an_in_flight_request_when_its_step_finishes_and_pins_an_agent_turn():
    sched = make()
    turn = Request("t", [1, 2, 3, 4], SamplingParams(max_tokens=50, ignore_eos=True), program_id="p")
    sched.add_request(turn)
    out = sched.schedule()
    # The stop string shows up in the text while the request's next step is running (or parked).
    assert sched.finish_requests(["t"], FinishReason.STOP) == [] and not turn.is_finished
    outputs = sched.update_from_output(out, ModelRunnerOutput({"t": 7}))
    assert [(o.request_id, o.finished, o.new_token_ids) for o in outputs] == [("t", True, [])]
    assert turn.finish_reason is FinishReason.STOP
    assert not sched.has_unfinished_requests()
    assert sched.pins.pinned_tokens == 4   # kept for the program's next turn, as a turn that ended by itself


@pytest.mark.parametrize("reason", [FinishReason.STOP, FinishReason.CANCELLED])
def test_ending_a_request_between_steps_frees_its_kv(reason):
    sched = make()
    r = Request("r", [1, 2, 3, 4, 5], SamplingParams(max_tokens=50, ignore_eos=True))
    sched.add_request(r)
    out = sched.schedule()
    sched.update_from_output(out, ModelRunnerOutput({"r": 7}))
    assert [o.request_id for o in sched.finish_requests(["r"], reason)] == ["r"] and r.finish_reason is reason
    assert sched.allocator.num_free_blocks == sched.allocator.num_blocks


# --- detokenized text with stop strings ------------------------------------------------------------------------
def test_output_text_finds_a_stop_string_inside_a_split_character():
    from worker.model_loader import load_default_tokenizer
    from worker.output_text import OutputText

    tok = load_default_tokenizer()
    text = "naïve café → done"
    ids = tok.encode(text, add_special_tokens=False)
    output = OutputText(tok, ["é →"])
    sent, matched = [], None
    for i, token in enumerate(ids):
        piece, matched = output.push([token], final=i == len(ids) - 1)
        sent.append(piece)
        if matched:
            break
    assert "".join(sent) == "naïve caf" and matched == "é →"
    assert all("\ufffd" not in piece for piece in sent)
