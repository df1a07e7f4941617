"""scaled_dot_product_attention and decode_attention on every backend, against the float64 reference."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from _env import INTERPRET, LOW

from fastlm import ops
from fastlm import reference as ref


def rel_err(got, want):
    # Inputs are of unit scale, so errors are measured against at least 1: an exactly-zero truth
    # (dq when each query sees a single key) would otherwise turn rounding noise into huge ratios.
    return ref.error(got, want, unit(want))


def unit(want):
    return want.abs().max().clamp_min(1.0)


FLOOR = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def check(got, want, torch_got, dtype, what):
    ref.assert_within_twice_torch(got, torch_got, want, floor=FLOOR[dtype], name=what, scale=unit(want))


def make(b, hq, hk, tq, tk, d, dtype, device):
    def t(h, n):
        return torch.randn(b, h, n, d, dtype=torch.float64).to(dtype).to(device).requires_grad_()

    return t(hq, tq), t(hk, tk), t(hk, tk)


def run_and_compare(q, k, v, mask, is_causal, backend, dtype, scale=None):
    gqa = q.shape[-3] != k.shape[-3]
    dout = torch.randn_like(q)
    out = ops.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                           enable_gqa=gqa, backend=backend)
    got = (out, *torch.autograd.grad(out, (q, k, v), dout))

    qc, kc, vc = (t.detach().cpu().double().requires_grad_() for t in (q, k, v))
    ref_out = ref.attention(qc, kc, vc, None if mask is None else mask.cpu(), is_causal, scale)
    want = (ref_out, *torch.autograd.grad(ref_out, (qc, kc, vc), dout.cpu().double()))

    tout = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=gqa)
    theirs = (tout, *torch.autograd.grad(tout, (q, k, v), dout))
    for name, g, r, th in zip(("out", "dq", "dk", "dv"), got, want, theirs):
        assert g.shape == r.shape and g.dtype == q.dtype, name
        check(g.cpu(), r, th.cpu(), dtype, name)


SIZES = [(1, 16), (17, 32), (100, 64), (129, 80), (256, 128)]
if INTERPRET:
    SIZES = [(1, 16), (17, 32), (100, 64), (129, 80)]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("t,d", SIZES)
def test_matches_reference(backend, device, t, d, causal):
    q, k, v = make(2, 2, 2, t, t, d, torch.float32, device)
    run_and_compare(q, k, v, None, causal, backend, torch.float32)


@pytest.mark.parametrize("dtype", LOW + ([] if INTERPRET else [torch.float64]))
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_dtypes(backend, device, dtype, causal):
    if dtype == torch.float64 and backend != "cpu" and backend != "torch":
        pytest.skip("float64 runs on the CPU backend")
    q, k, v = make(1, 2, 2, 77, 77, 64, dtype, device)
    run_and_compare(q, k, v, None, causal, backend, dtype)


@pytest.mark.parametrize("tq,tk", [(5, 37), (37, 5), (1, 64), (64, 1)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_unequal_lengths(backend, device, tq, tk, causal):
    q, k, v = make(1, 2, 2, tq, tk, 32, torch.float32, device)
    run_and_compare(q, k, v, None, causal, backend, torch.float32)


@pytest.mark.parametrize("hq,hk", [(4, 2), (4, 1), (6, 3)])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_grouped_query(backend, device, hq, hk, causal):
    q, k, v = make(2, hq, hk, 33, 33, 32, torch.float32, device)
    run_and_compare(q, k, v, None, causal, backend, torch.float32)


def _masks(b, h, tq, tk, device):
    """Masks of every broadcast shape, each with at least one fully masked query row."""
    g = torch.Generator().manual_seed(1)
    pad = torch.ones(b, tk, dtype=torch.bool)
    pad[0, tk // 2:] = False
    pad[-1, :] = False  # the whole last sequence is padding: every row masked
    full_bool = torch.rand(b, h, tq, tk, generator=g) > 0.3
    full_bool[0, 0, 0] = False
    additive = torch.randn(1, 1, tq, tk, generator=g)
    additive[0, 0, 1] = float("-inf")
    return {
        "key_padding": pad.view(b, 1, 1, tk).to(device),
        "full_bool": full_bool.to(device),
        "shared_additive": additive.to(device),
        "per_head_2d": (torch.rand(h, 1, tk, generator=g) > 0.5).to(device),
    }


@pytest.mark.parametrize("kind", ["key_padding", "full_bool", "shared_additive", "per_head_2d"])
def test_masks(backend, device, kind):
    b, h, tq, tk = 3, 2, 19, 45
    q, k, v = make(b, h, h, tq, tk, 32, torch.float32, device)
    mask = _masks(b, h, tq, tk, device)[kind]
    run_and_compare(q, k, v, mask, False, backend, torch.float32)


def test_mask_with_grouped_query_and_scale(backend, device):
    q, k, v = make(2, 4, 2, 40, 40, 16, torch.float32, device)
    mask = _masks(2, 4, 40, 40, device)["key_padding"]
    run_and_compare(q, k, v, mask, False, backend, torch.float32, scale=0.3)


def test_three_dim_input(backend, device):
    q = torch.randn(3, 20, 32, device=device, requires_grad=True)
    k = torch.randn(3, 24, 32, device=device, requires_grad=True)
    v = torch.randn(3, 24, 32, device=device, requires_grad=True)
    got = ops.scaled_dot_product_attention(q, k, v, backend=backend)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v), rtol=1e-4, atol=1e-5)


def test_dropout_runs_torch_path(backend, device):
    q, k, v = make(1, 2, 2, 16, 16, 16, torch.float32, device)
    torch.manual_seed(3)
    got = ops.scaled_dot_product_attention(q, k, v, dropout_p=0.5, backend=backend)
    torch.manual_seed(3)
    want = F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    torch.testing.assert_close(got, want)


@pytest.mark.skipif(INTERPRET, reason="compiles with inductor, not the interpreter")
def test_compile_fullgraph(backend, device):
    q, k, v = make(2, 4, 2, 24, 24, 32, torch.float32, device)
    mask = _masks(2, 4, 24, 24, device)["key_padding"]

    def f(q, k, v):
        a = ops.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, backend=backend)
        b = ops.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True, backend=backend)
        return a + b

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    got = compiled(q, k, v)
    want = f(q, k, v)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    gq = torch.autograd.grad(got.sum(), q)[0]
    wq = torch.autograd.grad(want.sum(), q)[0]
    torch.testing.assert_close(gq, wq, rtol=1e-5, atol=1e-5)


# --- decoding -------------------------------------------------------------------------------------


@pytest.mark.parametrize("hq,hk,tn", [(2, 2, 1), (4, 2, 1), (4, 1, 3)])
def test_decode_matches_full_attention(backend, device, hq, hk, tn):
    b, tmax, d = 3, 70 if not INTERPRET else 40, 32
    seqlens = torch.tensor([tmax, 5, 23][:b], dtype=torch.int32)
    seqlens = seqlens.clamp(min=tn)
    k_cache = torch.randn(b, hk, tmax, d, device=device)
    v_cache = torch.randn(b, hk, tmax, d, device=device)
    q = torch.randn(b, hq, tn, d, device=device)
    got = ops.decode_attention(q, k_cache, v_cache, seqlens.to(device), backend=backend)
    assert got.shape == q.shape
    for i in range(b):
        n = int(seqlens[i])
        # The Tn new tokens are the last Tn of a prefix of n: full causal attention over it,
        # expressed with keys 0..n-1 and queries at positions n-Tn..n-1.
        pos = torch.arange(n - tn, n).view(tn, 1)
        keep = torch.arange(n).view(1, n) <= pos
        want = ref.attention(q[i:i + 1].cpu(), k_cache[i:i + 1, :, :n].cpu(), v_cache[i:i + 1, :, :n].cpu(), keep)
        assert rel_err(got[i:i + 1].cpu(), want) < 2e-5, f"sequence {i}"


def _check_one_new_token(backend, device, seqlens, hk, g, d):
    """decode_attention of one new token per sequence, g query heads per key/value head, against
    the float64 reference; the GPU backends must refuse d < 16."""
    b, tmax = len(seqlens), int(max(seqlens))
    seqlens = torch.tensor(seqlens, dtype=torch.int32)
    k_cache = torch.randn(b, hk, tmax, d, device=device)
    v_cache = torch.randn(b, hk, tmax, d, device=device)
    q = torch.randn(b, g * hk, 1, d, device=device)
    if backend in ("triton", "cuda") and d < 16:  # the GPU kernels' documented range is 16..256
        with pytest.raises(ValueError, match="head dims"):
            ops.decode_attention(q, k_cache, v_cache, seqlens.to(device), backend=backend)
        return
    got = ops.decode_attention(q, k_cache, v_cache, seqlens.to(device), backend=backend)
    want = ref.decode_attention(q.cpu(), k_cache.cpu(), v_cache.cpu(), seqlens)
    for i in range(b):
        assert rel_err(got[i:i + 1].cpu(), want[i:i + 1]) < 2e-5, f"sequence {i}"


@pytest.mark.parametrize("d", [6, 24, 40, 100, 136])
def test_decode_lone_query_head_dims(backend, device, d):
    # One query per key/value head: the CPU's grouped path with groups of one, which splits D into
    # vectors of 64 and 8 floats and a scalar rest, and keys into groups of 8 and a rest.
    tmax = 75 if not INTERPRET else 20
    _check_one_new_token(backend, device, [tmax, 13], hk=2, g=1, d=d)


@pytest.mark.parametrize("g", [3, 4, 5, 8])
@pytest.mark.parametrize("d", [6, 24, 100, 128])
def test_decode_query_groups(backend, device, g, d):
    # Grouped-query attention, one new token: the CPU takes up to 4 queries of a group against
    # each load of a key (groups of 5 and 8 in two passes), a few keys at a time with a rest, and
    # D in vectors with a scalar rest.
    tmax = 75 if not INTERPRET else 20
    _check_one_new_token(backend, device, [tmax, 13, 1], hk=2, g=g, d=d)


@pytest.mark.parametrize("hq,tn,d", [(1, 1, 32), (2, 1, 32), (2, 3, 32), (4, 2, 128), (6, 1, 64)])
def test_decode_long_cache_few_heads(backend, device, hq, tn, d):
    # One sequence and one key/value head against 700 cached keys: the CPU splits the cache into
    # slices and merges their partial softmaxes. The slices of the small heads run on the calling
    # thread; those of 8 queries x 128 dims pass the CPU's inline threshold and run on its pool.
    tmax = 700 if not INTERPRET else 80
    d = d if not INTERPRET else 16
    seqlens = torch.tensor([tmax - 3], dtype=torch.int64)
    k_cache = torch.randn(1, 1, tmax, d, device=device)
    v_cache = torch.randn(1, 1, tmax, d, device=device)
    q = torch.randn(1, hq, tn, d, device=device)
    got = ops.decode_attention(q, k_cache, v_cache, seqlens.to(device), backend=backend)
    want = ref.decode_attention(q.cpu(), k_cache.cpu(), v_cache.cpu(), seqlens)
    assert rel_err(got.cpu(), want) < 2e-5


@pytest.mark.parametrize("hq", [2, 4])
@pytest.mark.parametrize("dtype", LOW)
def test_decode_low_precision(backend, device, dtype, hq):
    b, hk, tmax, d = 2, 2, 50, 64
    seqlens = torch.tensor([50, 17], dtype=torch.int64, device=device)
    k_cache = torch.randn(b, hk, tmax, d, device=device).to(dtype)
    v_cache = torch.randn(b, hk, tmax, d, device=device).to(dtype)
    q = torch.randn(b, hq, 1, d, device=device).to(dtype)
    got = ops.decode_attention(q, k_cache, v_cache, seqlens, backend=backend)
    theirs = ops.decode_attention(q, k_cache, v_cache, seqlens, backend="torch")
    want = ref.decode_attention(q.cpu(), k_cache.cpu(), v_cache.cpu(), seqlens.cpu())
    check(got.cpu(), want, theirs.cpu(), dtype, "decode")


def test_decode_bad_input(backend, device):
    q = torch.randn(2, 4, 1, 16, device=device)
    kc = torch.randn(2, 2, 8, 16, device=device)
    lens = torch.tensor([8, 3], device=device)
    with pytest.raises(ValueError, match="cache_seqlens"):
        ops.decode_attention(q, kc, kc, torch.tensor([9, 3], device=device), backend=backend)
    with pytest.raises(ValueError, match="cache_seqlens"):
        ops.decode_attention(q, kc, kc, torch.tensor([8, 0], device=device), backend=backend)
    with pytest.raises(TypeError, match="cache_seqlens"):
        ops.decode_attention(q, kc, kc, lens.float(), backend=backend)
    with pytest.raises(ValueError, match="multiple"):
        ops.decode_attention(torch.randn(2, 3, 1, 16, device=device), kc, kc, lens, backend=backend)
    with pytest.raises(ValueError, match="k_cache"):
        ops.decode_attention(q, kc[..., :8], kc[..., :8], lens, backend=backend)


class HostReads:
    """Records every read of a tensor's value into Python made by code outside triton (whose
    interpreter reads its CPU tensors to run kernels; on a GPU nothing of it runs). Each such read
    would make a GPU wait for the device: a decode step must have none."""

    NAMES = ("min", "max", "item", "tolist", "nonzero", "__bool__", "__int__", "__float__", "__index__")

    def __init__(self, monkeypatch):
        self.reads, self._mp = [], monkeypatch
        for name in self.NAMES:
            monkeypatch.setattr(torch.Tensor, name, self._logged(name, getattr(torch.Tensor, name)))

    def _logged(self, name, original):
        def read(t, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if f"{os.sep}triton{os.sep}" not in caller:
                self.reads.append(f"{name} from {caller}:{sys._getframe(1).f_lineno}")
            return original(t, *args, **kwargs)
        return read

    def stop(self) -> list[str]:
        self._mp.undo()
        return self.reads


def test_decode_seqlen_range(backend, device, monkeypatch):
    # Lengths known on the host: the same result, without reading cache_seqlens back (on a GPU
    # that read waits for the device) here or in the kernels' launchers, and the range itself is checked.
    q = torch.randn(2, 4, 1, 16, device=device)
    kc = torch.randn(2, 2, 8, 16, device=device)
    lens = torch.tensor([6, 6], dtype=torch.int32, device=device)
    want = ops.decode_attention(q, kc, kc, lens, backend=backend)
    reads = HostReads(monkeypatch)
    got = ops.decode_attention(q, kc, kc, lens, backend=backend, seqlen_range=(6, 6))
    assert reads.stop() == []
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    for bad in ((0, 6), (6, 9), (7, 6)):
        with pytest.raises(ValueError, match="seqlen_range"):
            ops.decode_attention(q, kc, kc, lens, backend=backend, seqlen_range=bad)


def test_decode_launcher_checks_lengths_without_host_reads(backend, device, monkeypatch):
    """The GPU launchers' own length check runs on the device; on a CPU it still names the length."""
    if backend not in ("triton", "cuda"):
        pytest.skip("the GPU backends' launchers")
    import fastlm.kernels.attention as ka

    q = torch.randn(2, 4, 1, 16, device=device)
    kc = torch.randn(2, 2, 8, 16, device=device)
    lens = torch.tensor([6, 3], dtype=torch.int64, device=device)
    launch = ka.decode_attention if backend == "triton" else torch.ops.fastlm_C.decode_attention
    reads = HostReads(monkeypatch)
    got = launch(q, kc, kc, lens, 0.25)
    assert reads.stop() == []
    torch.testing.assert_close(got, ops.decode_attention(q, kc, kc, lens, scale=0.25, backend="torch"))
    if device == "cpu":
        with pytest.raises(ValueError, match=r"cache_seqlens\[1\] = 9 must lie in \[Tn, Tmax\] = \[1, 8\]"):
            launch(q, kc, kc, torch.tensor([6, 9], device=device), 0.25)


# --- bad input ------------------------------------------------------------------------------------


def test_bad_input(backend, device):
    q = torch.randn(2, 4, 8, 16, device=device)
    k = torch.randn(2, 4, 8, 16, device=device)
    sdpa = ops.scaled_dot_product_attention
    with pytest.raises(ValueError, match="enable_gqa"):
        sdpa(q, k[:, :2], k[:, :2], backend=backend)
    with pytest.raises(ValueError, match="multiple"):
        sdpa(q, k[:, :3], k[:, :3], enable_gqa=True, backend=backend)
    with pytest.raises(ValueError, match="head dim"):
        sdpa(q, k[..., :8], k[..., :8], backend=backend)
    with pytest.raises(ValueError, match="attn_mask"):
        sdpa(q, k, k, attn_mask=torch.ones(2, 4, 8, 7, dtype=torch.bool, device=device), backend=backend)
    with pytest.raises(TypeError, match="attn_mask"):
        sdpa(q, k, k, attn_mask=torch.ones(8, 8, dtype=torch.int64, device=device), backend=backend)
    with pytest.raises(ValueError, match="is_causal"):
        sdpa(q, k, k, attn_mask=torch.ones(8, 8, dtype=torch.bool, device=device), is_causal=True, backend=backend)
    with pytest.raises(TypeError, match="dtype"):
        sdpa(q, k.double(), k, backend=backend)
    with pytest.raises(TypeError, match="query"):
        sdpa(q.long(), k, k, backend=backend)
    with pytest.raises(ValueError, match="meta"):
        sdpa(q, k.to("meta"), k, backend=backend)
    with pytest.raises(ValueError, match="batch"):  # batch 3 against 2: no broadcast (1 against 2 is one)
        kb = torch.cat([k, k[:1]])
        sdpa(q, kb, kb, backend=backend)


# --- memory ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_extra_memory_is_linear_in_length(backend, device):
    """At T = 8192 a T x T float32 score matrix is 256 MiB; the fused path must stay far below."""
    if device != "cpu" or backend != "cpu":
        pytest.skip("measured for the CPU backend in a fresh process")
    script = textwrap.dedent("""
        import torch, fastlm
        from fastlm.bench.harness import host_peak_growth
        def qkv(t):
            return [torch.randn(1, 1, t, 32, requires_grad=True) for _ in range(3)]
        def run(q, k, v):
            fastlm.ops.scaled_dot_product_attention(q, k, v, is_causal=True, backend="cpu").sum().backward()
        run(*qkv(256))  # start the thread pool and its scratch on a small case
        q, k, v = qkv(8192)
        print(host_peak_growth(lambda: run(q, k, v)))
    """)
    grown = int(subprocess.check_output([sys.executable, "-c", script], text=True).split()[-1])
    # Inputs' gradients and the output are 4 x 1 MiB; one T x T float32 matrix would be 256 MiB.
    assert grown < 32 * 2**20, f"peak memory grew by {grown / 2**20:.0f} MiB"


# --- head-dim tiles in half precision -------------------------------------------------------------


@pytest.mark.parametrize("d", [16, 32, 80, 128, 256])  # every tile of the GPU kernels (64: test_dtypes)
def test_half_precision_head_dim_tiles(backend, device, d):
    q, k, v = make(1, 2, 2, 33 if INTERPRET else 77, 33 if INTERPRET else 77, d, torch.float16, device)
    run_and_compare(q, k, v, None, True, backend, torch.float16)


# --- on a GPU only: too slow for the interpreter ---------------------------------------------------

GPU_BACKENDS = ["cuda", "triton"]


def _gpu_backend(name):
    from fastlm import backends

    why = backends.why_unavailable(name, "cuda")
    if why is not None:
        pytest.skip(why)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("t", [1, 77, 200, 1024])
@pytest.mark.parametrize("d", [16, 64, 80, 128, 160, 256])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("gpu_backend", GPU_BACKENDS)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_sweep(gpu_backend, dtype, d, t, causal):
    _gpu_backend(gpu_backend)
    q, k, v = make(1, 2, 2, t, t, d, dtype, "cuda")
    run_and_compare(q, k, v, None, causal, gpu_backend, dtype)


@pytest.mark.parametrize("t", [77, 1024])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("gpu_backend", GPU_BACKENDS)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_grouped_query_with_key_padding(gpu_backend, dtype, d, t):
    _gpu_backend(gpu_backend)
    q, k, v = make(2, 4, 2, t, t, d, dtype, "cuda")
    mask = _masks(2, 4, t, t, "cuda")["key_padding"]
    run_and_compare(q, k, v, mask, False, gpu_backend, dtype)


def _decode_step(backend, ids, start, w):
    """One token of a small decoder layer: token + position embedding, a norm, a quantized
    projection to q, attention against the KV cache (host-known lengths), a final norm."""
    b, c = ids.shape[0], w["tok"].shape[1]
    h = ops.token_position_embedding(ids, w["tok"], w["pos"], start, backend=backend)
    h = h + ops.embedding(ids, w["tok"], backend=backend)
    x = ops.rms_norm(h, (c,), w["norm"], backend=backend)
    q = ops.quant_linear(x, w["wq"], backend=backend).view(b, 1, w["hq"], -1).transpose(1, 2).contiguous()
    o = ops.decode_attention(q, w["k"], w["v"], w["lens"], backend=backend, seqlen_range=(start + 1, start + 1))
    return ops.layer_norm(o.transpose(1, 2).reshape(b, 1, c), (c,), w["norm"], w["norm"], backend=backend)


@pytest.mark.parametrize("gpu_backend", GPU_BACKENDS)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_decode_step_never_waits_and_graph_captures(gpu_backend):
    _gpu_backend(gpu_backend)
    from fastlm.quant import quantize

    b, hq, hk, d, tmax, start, dt = 2, 4, 2, 64, 96, 40, torch.bfloat16
    c = hq * d
    dev = "cuda"
    w = {"tok": torch.randn(100, c, device=dev, dtype=dt), "pos": torch.randn(tmax, c, device=dev, dtype=dt),
         "norm": torch.randn(c, device=dev, dtype=dt), "wq": quantize(torch.randn(c, c, device=dev, dtype=dt), 8, 128),
         "k": torch.randn(b, hk, tmax, d, device=dev, dtype=dt), "v": torch.randn(b, hk, tmax, d, device=dev, dtype=dt),
         "lens": torch.full((b,), start + 1, dtype=torch.int32, device=dev), "hq": hq}
    ids = torch.randint(0, 100, (b, 1), device=dev)
    with torch.no_grad():
        for _ in range(2):  # compile and cache everything first: only a step in steady state is judged
            want = _decode_step(gpu_backend, ids, start, w)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = _decode_step(gpu_backend, ids, start, w)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.testing.assert_close(got, want, rtol=0, atol=0)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            _decode_step(gpu_backend, ids, start, w)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = _decode_step(gpu_backend, ids, start, w)
        ids.copy_(torch.randint(0, 100, (b, 1), device=dev))
        graph.replay()
        torch.testing.assert_close(captured, _decode_step(gpu_backend, ids, start, w), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_deterministic_mode():
    """The cuda backward's dQ atomics refuse deterministic mode; the Triton backward has none and
    repeats bit for bit."""
    q, k, v = make(1, 4, 2, 300, 300, 64, torch.bfloat16, "cuda")
    torch.use_deterministic_algorithms(True)
    try:
        for be in GPU_BACKENDS:
            from fastlm import backends

            if backends.why_unavailable(be, "cuda") is not None:
                continue
            out = ops.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, backend=be)
            if be == "cuda":
                with pytest.raises(RuntimeError, match="deterministic"):
                    out.sum().backward()
                continue
            grads = [torch.autograd.grad(ops.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=True, backend=be).sum(), (q, k, v)) for _ in range(2)]
            for a, b in zip(*grads):
                assert torch.equal(a, b)
    finally:
        torch.use_deterministic_algorithms(False)
