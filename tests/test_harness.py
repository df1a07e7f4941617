"""The benchmark harness's timing order: turns across competitors (every other round reversed),
and bursts within a turn."""

import torch

from fastlm.bench import harness


def _competitors(log):
    # Each call returns its "duration": 100 for the first call of a turn (it follows another
    # competitor), 1 for a call that follows one of its own.
    def make(name):
        def fn():
            first = not log or log[-1] != name
            log.append(name)
            return 100.0 if first else 1.0
        return fn

    return {"a": make("a"), "b": make("b")}


def test_interleaved_turns_alternate(monkeypatch):
    monkeypatch.setattr(harness, "once_ms", lambda fn, device: fn())
    log = []
    ms = harness.interleaved_ms(_competitors(log), torch.device("cpu"), warmup=1, reps=3)
    # Every other round runs in reverse: each competitor's turn follows the other's as often as
    # one of its own.
    assert log == ["a", "b"] + ["a", "b", "b", "a", "a", "b"]
    assert ms == {"a": 100.0, "b": 100.0}


def test_burst_keeps_all_but_the_first_call_of_a_turn(monkeypatch):
    monkeypatch.setattr(harness, "once_ms", lambda fn, device: fn())
    log = []
    ms = harness.interleaved_ms(_competitors(log), torch.device("cpu"), warmup=1, reps=3, burst=2)
    assert log == ["a", "b"] + ["a"] * 2 + ["b"] * 4 + ["a"] * 4 + ["b"] * 2
    assert ms == {"a": 1.0, "b": 1.0}
