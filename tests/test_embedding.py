"""embedding and token_position_embedding on every backend, against the float64 reference."""

from __future__ import annotations

import pytest
import torch
from _env import LOW

import fastlm
from fastlm import ops
from fastlm import reference as ref

DTYPES = [torch.float32, *LOW]


def table(v, d, dtype, device):
    return torch.randn(v, d, dtype=torch.float64).to(dtype).to(device).requires_grad_()


def ids_like(kind, shape, v, idtype, device):
    if kind == "uniform":
        ids = torch.randint(0, v, shape)
    elif kind == "repeated":
        ids = torch.full(shape, v // 2)
    else:  # "skewed": a few hot ids, like real token streams
        ids = torch.randint(0, 4, shape) * (v // 4)
    return ids.to(idtype).to(device)


def reference_grad(ids, v, dout, padding_idx=None):
    return ref.embedding_backward(ids.cpu(), dout.cpu(), v, padding_idx)


def grad_tol(dtype, count):
    """Rounding of the float32 sum of `count` rows, then one rounding to dtype."""
    return dict(rtol=torch.finfo(dtype).eps * 2, atol=torch.finfo(dtype).eps * 2 + 1e-6 * count)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("idtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("shape,d", [((0,), 8), ((5,), 1), ((3, 7), 7), ((2, 3, 4), 64), ((37,), 300)], ids=str)
def test_forward_and_grad(backend, device, dtype, idtype, shape, d):
    v = 50
    w = table(v, d, dtype, device)
    ids = ids_like("uniform", shape, v, idtype, device)
    out = ops.embedding(ids, w, backend=backend)
    assert out.shape == (*shape, d) and out.dtype == dtype
    assert torch.equal(out.cpu().double(), ref.embedding(ids.cpu(), w.detach().cpu()))  # a gather is exact
    dout = torch.randn(*shape, d, dtype=torch.float64)
    (g,) = torch.autograd.grad(out, w, dout.to(dtype).to(device))
    assert g.dtype == dtype
    torch.testing.assert_close(g.cpu().double(), reference_grad(ids, v, dout), **grad_tol(dtype, 37))


@pytest.mark.parametrize("kind", ["repeated", "skewed"])
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_grad_with_collisions(backend, device, kind, deterministic):
    v, d = 64, 48
    w = table(v, d, torch.float32, device)
    ids = ids_like(kind, (4, 50), v, torch.int64, device)
    dout = torch.randn(4, 50, d, dtype=torch.float64)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        (g,) = torch.autograd.grad(ops.embedding(ids, w, backend=backend), w, dout.float().to(device))
    finally:
        torch.use_deterministic_algorithms(prev)
    torch.testing.assert_close(g.cpu().double(), reference_grad(ids, v, dout), rtol=1e-5, atol=1e-4)


def test_padding_row_gets_no_gradient(backend, device):
    v, d = 20, 16
    w = table(v, d, torch.float32, device)
    ids = torch.tensor([[0, 3, 3, 7], [3, 19, 0, 3]], device=device)
    out = ops.embedding(ids, w, padding_idx=3, backend=backend)
    assert torch.equal(out.cpu().double(), ref.embedding(ids.cpu(), w.detach().cpu()))  # the padding row too
    dout = torch.randn(2, 4, d, dtype=torch.float64)
    (g,) = torch.autograd.grad(out, w, dout.float().to(device))
    torch.testing.assert_close(g.cpu().double(), reference_grad(ids, v, dout, padding_idx=3), rtol=1e-5, atol=1e-5)
    (g_neg,) = torch.autograd.grad(ops.embedding(ids, w, padding_idx=-17, backend=backend), w, dout.float().to(device))
    torch.testing.assert_close(g_neg, g)  # -17 is row 3 of 20, as in torch


def test_deterministic_gradient_is_bitwise_reproducible(backend, device):
    v, d = 97, 40
    w = table(v, d, torch.float32, device)
    ids = ids_like("skewed", (8, 64), v, torch.int64, device)
    dout = torch.randn(8, 64, d, device=device)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [torch.autograd.grad(ops.embedding(ids, w, backend=backend), w, dout)[0] for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(prev)
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("start_pos", [0, 5])
def test_token_position_embedding(backend, device, dtype, start_pos):
    v, p, d = 40, 16, 24
    tok, pos = table(v, d, dtype, device), table(p, d, dtype, device)
    ids = torch.randint(0, v, (3, 9), device=device)
    out = ops.token_position_embedding(ids, tok, pos, start_pos, backend=backend)
    want = ref.token_position_embedding(ids.cpu(), tok.detach().cpu(), pos.detach().cpu(), start_pos)
    assert out.shape == (3, 9, d) and out.dtype == dtype
    # One rounding of the float32 sum: within half an ulp of the float64 truth, as torch's add.
    torch.testing.assert_close(out.cpu().double(), want, rtol=torch.finfo(dtype).eps, atol=0)
    dout = torch.randn(3, 9, d, dtype=torch.float64)
    dtok, dpos = torch.autograd.grad(out, (tok, pos), dout.to(dtype).to(device))
    torch.testing.assert_close(dtok.cpu().double(), reference_grad(ids, v, dout), **grad_tol(dtype, 9))
    want_pos = torch.zeros(p, d, dtype=torch.float64)
    want_pos[start_pos:start_pos + 9] = dout.sum(0)
    torch.testing.assert_close(dpos.cpu().double(), want_pos, **grad_tol(dtype, 3))


def test_token_position_embedding_1d_ids(backend, device):
    tok, pos = table(10, 8, torch.float32, device), table(6, 8, torch.float32, device)
    ids = torch.tensor([1, 2, 9], device=device)
    out = ops.token_position_embedding(ids, tok, pos, 3, backend=backend)
    torch.testing.assert_close(out, tok[ids] + pos[3:6])


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [10, -1, 1 << 40])
def test_out_of_range_ids_raise_index_error_naming_the_value(backend, device, bad):
    if device == "cuda" and backend != "torch":
        pytest.skip("a device-side assert on a GPU, which ends the process's CUDA context: "
                    "test_out_of_range_id_on_a_gpu_is_a_device_assert")
    w = table(10, 4, torch.float32, device)
    if bad >= 1 << 31:
        ids = torch.tensor([1, bad, 2], device=device)
    else:
        ids = torch.tensor([1, bad, 2], dtype=torch.int32, device=device)
    with pytest.raises(IndexError, match=f"id {bad} is out of range"):
        ops.embedding(ids, w, backend=backend)
    with pytest.raises(IndexError, match=f"id {bad} is out of range"):
        ops.token_position_embedding(ids, w, table(8, 4, torch.float32, device), backend=backend)


def test_lookup_reads_nothing_on_the_host(backend, device, monkeypatch):
    """The kernels check ids on the device: a lookup makes no host read (on a GPU each would wait
    for the device, once per decoded token)."""
    if backend == "torch":
        pytest.skip("the torch path checks ids itself, with a host read")
    from test_attention import HostReads

    w, ids = table(10, 8, torch.float32, device), torch.tensor([[1, 9, 2]], device=device)
    want = ops.embedding(ids, w, backend="torch"), ops.token_position_embedding(ids, w, w, 4, backend="torch")
    reads = HostReads(monkeypatch)
    with torch.no_grad():
        got = ops.embedding(ids, w, backend=backend), ops.token_position_embedding(ids, w, w, 4, backend=backend)
    assert reads.stop() == []
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r)


_BAD_ID_ON_GPU = """
import sys, torch
from fastlm import ops
w = torch.randn(10, 4, device="cuda")
out = ops.embedding(torch.tensor([1, 10, 2], device="cuda"), w, backend=sys.argv[1])
torch.cuda.synchronize()
print("no error")
"""


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("gpu_backend", ["cuda", "triton"])
def test_out_of_range_id_on_a_gpu_is_a_device_assert(gpu_backend):
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-c", _BAD_ID_ON_GPU, gpu_backend], capture_output=True, text=True,
                         timeout=120)
    log = run.stdout + run.stderr
    assert run.returncode != 0 and "no error" not in run.stdout, log
    assert "device-side assert" in log or "out of range" in log, log
    if gpu_backend == "cuda":
        assert "id 10 at position 1 is out of range for an embedding table of 10 rows" in log, log


@pytest.mark.parametrize(
    "call, err, words",
    [
        (lambda ids, w: ops.embedding(ids.float(), w), TypeError, "int32 or int64"),
        (lambda ids, w: ops.embedding(ids, w[0]), ValueError, "weight must be 2-D"),
        (lambda ids, w: ops.embedding(ids, w.long()), TypeError, "weight must be a floating-point"),
        (lambda ids, w: ops.embedding(ids, torch.empty(10, 4, device="meta")), ValueError, "weight is on meta"),
        (lambda ids, w: ops.embedding(ids, w, padding_idx=10), ValueError, "padding_idx"),
        (lambda ids, w: ops.token_position_embedding(ids, w, w[:2]), ValueError, "start_pos"),
        (lambda ids, w: ops.token_position_embedding(ids, w, w, start_pos=9), ValueError, "start_pos"),
        (lambda ids, w: ops.token_position_embedding(ids, w, w[:, :2]), ValueError, "width and dtype"),
        (lambda ids, w: ops.token_position_embedding(ids[0], w, w), ValueError, "time dimension"),
    ],
)
def test_bad_input_names_the_argument(call, err, words):
    ids, w = torch.tensor([1, 2, 3]), torch.randn(10, 4)
    with pytest.raises(err, match=words):
        call(ids, w)


# --- module, patch, compile ---------------------------------------------------------------------


def test_module_is_a_drop_in():
    torch.manual_seed(0)
    slow = torch.nn.Embedding(30, 8, padding_idx=0)
    fast = fastlm.nn.Embedding(30, 8, padding_idx=0)
    assert fast.state_dict().keys() == slow.state_dict().keys()
    fast.load_state_dict(slow.state_dict())
    ids = torch.randint(0, 30, (4, 5))
    torch.testing.assert_close(fast(ids), slow(ids))
    pre = fastlm.nn.Embedding.from_pretrained(slow.weight.detach(), freeze=False)
    assert isinstance(pre, fastlm.nn.Embedding) and pre.weight.requires_grad
    torch.testing.assert_close(pre(ids), slow(ids))
    capped = fastlm.nn.Embedding(30, 8, max_norm=1.0)  # torch's path, torch's semantics
    assert capped(ids).norm(dim=-1).max() <= 1.0 + 1e-5
    model = fastlm.patch(torch.nn.Sequential(torch.nn.Embedding(30, 8)))
    assert type(model[0]) is fastlm.nn.Embedding


@pytest.mark.slow
def test_compile_fullgraph(backend, device):
    if backend == "triton" and device == "cpu":
        pytest.skip("torch.compile does not trace the Triton interpreter")
    torch._dynamo.reset()
    tok, pos = table(50, 16, torch.float32, device), table(12, 16, torch.float32, device)

    def f(ids):
        return (ops.token_position_embedding(ids, tok, pos, 2) + ops.embedding(ids, tok, padding_idx=1)).sum()

    ids = torch.randint(0, 50, (2, 10), device=device)
    with fastlm.use_backend(backend):
        eager = f(ids)
        (g,) = torch.autograd.grad(eager, tok)
        out = torch.compile(f, fullgraph=True)(ids)
        (gc,) = torch.autograd.grad(out, tok)
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(gc, g)


def test_gradcheck_float64_cpu():
    if fastlm.backends.why_unavailable("cpu", "cpu") is not None:
        pytest.skip("the cpu backend is not built")
    tok = torch.randn(12, 5, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[3, 3, 0, 11], [2, 3, 9, 0]])
    assert torch.autograd.gradcheck(lambda w: ops.embedding(ids, w, backend="cpu"), (tok,))
    assert torch.autograd.gradcheck(
        lambda t, p: ops.token_position_embedding(ids, t, p, 2, backend="cpu"), (tok, pos)
    )
