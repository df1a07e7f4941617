"""The benchmark harness's timing order: turns across competitors (every other round reversed),
and bursts within a turn; and the benchmarks that use it."""

import pytest
import torch

from fastlm import backends
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


def test_quant_stream_rows_report_against_the_read_timed_in_the_same_turns(monkeypatch):
    from fastlm.bench import quant_matmul as qm

    monkeypatch.setattr(qm, "_llc_bytes", lambda device: 1 << 16)
    rows = qm._stream_rows(64, 128, (1, 3), reps=2)
    impls = {r["impl"] for r in rows}
    assert "dense fp32" in impls and qm.READ not in impls
    assert impls == {"dense fp32"} | {f"{c} {p}" for c in qm.STREAM_CONFIGS for p in ("float", "act_quant")}
    for r in rows:
        assert r["ms"] > 0 and r["read_GBps"] > 0
        assert abs(r["pct_read_bw"] - 100 * r["weight_GBps"] / r["read_GBps"]) < 1e-6 * r["pct_read_bw"]
        # The best read is at least the sum's, so the share of it is at most the share of the sum.
        assert r["pct_best_read"] <= r["pct_read_bw"] * (1 + 1e-9)
    dense = [r for r in rows if r["impl"] == "dense fp32"]
    assert [r["m"] for r in dense] == [1, 3] and all(abs(r["x_dense"] - 1) < 1e-12 for r in dense)


def test_quantized_decode_times_its_competitors_in_turns(monkeypatch):
    from fastlm.bench import model as bm
    from fastlm.bench import quant_matmul as qm

    if "cpu" not in backends.available("cpu"):
        pytest.skip(backends.why_unavailable("cpu", "cpu"))
    monkeypatch.setattr(qm, "read_bandwidth", lambda device: 10.0)
    calls = []
    timed = harness.interleaved_ms

    def record(fns, device, **kw):
        calls.append(list(fns))
        return timed(fns, device, **kw)

    monkeypatch.setattr(harness, "interleaved_ms", record)
    small = dict(n_layer=2, d_model=64, n_head=4, n_kv_head=2, vocab_size=256, block_size=160, mlp_ratio=3)
    out = bm.quantized_decode(quick=True, config=small)
    names = list(bm.DECODE_COMPETITORS)
    # Batch 1, batch 8 and the prefill: each one round of turns over every competitor.
    assert calls == [[f"{n} +{k}" for n in names for k in (1, 5)]] * 2 + [names]
    assert list(out["rows"]) == names and out["config"]["d_model"] == 64
    for r in out["rows"].values():
        assert r["decode_b1_tok_s"] > 0 and r["decode_b8_tok_s"] > 0 and r["prefill_512_tok_s"] > 0
        assert abs(r["pct_read_bw"] - 10 * r["achieved_GBps"]) < 1e-9 * r["pct_read_bw"]
    # A quantized model reads fewer bytes a token than the float32 one.
    assert out["rows"]["fastlm int4/32"]["bytes_per_token"] < out["rows"]["torch fp32"]["bytes_per_token"]
