"""fastlm.nn.MultiheadAttention against torch.nn.MultiheadAttention on the same weights."""

from __future__ import annotations

import pytest
import torch

import fastlm
from fastlm import nn


def pair(batch_first, bias=True, dropout=0.0, **kw):
    torch.manual_seed(0)
    theirs = torch.nn.MultiheadAttention(64, 4, dropout=dropout, bias=bias, batch_first=batch_first, **kw)
    ours = nn.MultiheadAttention(64, 4, dropout=dropout, bias=bias, batch_first=batch_first, **kw)
    ours.load_state_dict(theirs.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    return ours, theirs


def inputs(batch_first, b=3, tq=9, tk=11, self_attention=False):
    def t(n):
        x = torch.randn(b, n, 64) if batch_first else torch.randn(n, b, 64)
        return x.requires_grad_()

    q = t(tq)
    if self_attention:
        return q, q, q
    kv = t(tk)
    return q, kv, kv


def masks(b, tq, tk):
    kpm = torch.zeros(b, tk, dtype=torch.bool)
    kpm[0, -3:] = True
    # All but one key of the last sequence is padding. (With every key masked torch's module
    # gives NaN, fastlm zeros, as F.scaled_dot_product_attention does; tests/test_attention.py
    # checks that case.)
    kpm[-1, 1:] = True
    return {
        "none": {},
        "key_padding_bool": {"key_padding_mask": kpm},
        "key_padding_float": {"key_padding_mask": torch.where(kpm, float("-inf"), 0.0)},
        "attn_bool": {"attn_mask": torch.rand(tq, tk) > 0.7},
        "attn_float_3d": {"attn_mask": torch.randn(b * 4, tq, tk)},
        "both": {"key_padding_mask": kpm, "attn_mask": torch.rand(tq, tk) > 0.8},
    }


def compare(ours, theirs, args, kwargs, backend):
    with fastlm.use_backend(backend):
        got, got_w = ours(*args, need_weights=False, **kwargs)
    want, _ = theirs(*args, need_weights=False, **kwargs)
    assert got_w is None
    # torch gives NaN where a row has no key left; our kernels give 0 there (as F.sdpa does).
    keep = ~torch.isnan(want)
    torch.testing.assert_close(got[keep], want[keep], rtol=1e-4, atol=1e-5)
    dy = torch.randn_like(want)
    params = [p for p in ours.parameters()]
    g = torch.autograd.grad(got, [args[0], *params], dy.masked_fill(~keep, 0))
    w = torch.autograd.grad(want, [args[0], *theirs.parameters()], dy.masked_fill(~keep, 0))
    for a, b in zip(g, w):
        torch.testing.assert_close(a, torch.nan_to_num(b), rtol=1e-4, atol=1e-5)


KINDS = ["none", "key_padding_bool", "key_padding_float", "attn_bool", "attn_float_3d", "both"]


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_matches_torch(backend, device, batch_first, kind):
    if device != "cpu":
        pytest.skip("module parity is checked on CPU tensors")
    ours, theirs = pair(batch_first)
    args = inputs(batch_first)
    kwargs = masks(3, 9, 11)[kind]
    compare(ours, theirs, args, kwargs, backend)


@pytest.mark.parametrize("batch_first", [True, False])
def test_self_attention_causal_hint(backend, device, batch_first):
    ours, theirs = pair(batch_first, bias=False)
    args = inputs(batch_first, tq=10, self_attention=True)
    causal = torch.nn.Transformer.generate_square_subsequent_mask(10)
    compare(ours, theirs, args, {"attn_mask": causal, "is_causal": True}, backend)


def test_need_weights_takes_torch_path():
    ours, theirs = pair(True)
    args = inputs(True)
    got, got_w = ours(*args)
    want, want_w = theirs(*args)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_w, want_w)


def test_unbatched(backend, device):
    ours, theirs = pair(False)
    q, kv = torch.randn(7, 64), torch.randn(5, 64)
    with fastlm.use_backend(backend):
        got, _ = ours(q, kv, kv, need_weights=False)
    want, _ = theirs(q, kv, kv, need_weights=False)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_other_configs_fall_back_to_torch():
    ours, theirs = pair(True, add_bias_kv=True, kdim=16, vdim=24)
    q, k, v = torch.randn(2, 5, 64), torch.randn(2, 6, 16), torch.randn(2, 6, 24)
    torch.testing.assert_close(ours(q, k, v, need_weights=False)[0], theirs(q, k, v, need_weights=False)[0])


def test_bad_masks():
    ours, _ = pair(True)
    q, k, v = inputs(True)
    with pytest.raises(ValueError, match="key_padding_mask"):
        ours(q, k, v, key_padding_mask=torch.zeros(3, 5, dtype=torch.bool), need_weights=False)
    with pytest.raises(ValueError, match="attn_mask"):
        ours(q, k, v, attn_mask=torch.zeros(4, 11), need_weights=False)
    with pytest.raises(RuntimeError, match="is_causal"):
        ours(q, k, v, is_causal=True, need_weights=False)


def test_patch_swaps_multihead_attention():
    model = torch.nn.Sequential(torch.nn.MultiheadAttention(64, 4))
    fastlm.patch(model)
    assert type(model[0]) is nn.MultiheadAttention
    fastlm.unpatch(model)
    assert type(model[0]) is torch.nn.MultiheadAttention
