"""Benchmark cases for scaled_dot_product_attention and decode_attention.

FLOPs per pass (two matmuls of 2 * Tq * Tk * D each per head; half of them when causal):
    forward           4 * B * H * Tq * Tk * D   (x 1/2 causal)
    backward          2.5 x forward (five matmuls instead of two)
    forward+backward  3.5 x forward
Decoding reads the valid part of the cache once per token, so it is measured in bytes:
    2 * B * Hk * L * D * itemsize per step, against copy bandwidth.

Competitors: each fastlm backend; "torch" = F.scaled_dot_product_attention with torch's own
choice of kernel; each of its kernels forced in turn ("torch-math", and on a GPU "torch-flash",
"torch-efficient", "torch-cudnn"); "naive" = softmax(q k^T) v written out, holding the T x T
scores (fastlm.reference.attention, the tests' reference, run in the benchmark's dtype);
"torch.compile" of F.scaled_dot_product_attention.

`extra` measures the peak memory a forward+backward adds against T, in a fresh process per
point on the CPU (peak resident set growth) and with torch.cuda.max_memory_allocated on a GPU.
"""

from __future__ import annotations

import functools
import math
import subprocess
import sys
import textwrap

import torch
import torch.nn.functional as F

from fastlm import backends, ops, reference
from fastlm.bench.harness import Case


def naive(q, k, v, is_causal):
    return reference.attention(q, k, v, is_causal=is_causal, dtype=q.dtype)


def _forced(kernel):
    """F.sdpa restricted to one of torch's kernels."""
    from torch.nn.attention import sdpa_kernel

    def fn(q, k, v, is_causal):
        with sdpa_kernel(kernel):
            return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)

    return fn


def _torch_kernels(device: torch.device) -> dict[str, object]:
    from torch.nn.attention import SDPBackend

    names = {"torch-math": SDPBackend.MATH}
    if device.type == "cuda":
        names |= {"torch-flash": SDPBackend.FLASH_ATTENTION, "torch-efficient": SDPBackend.EFFICIENT_ATTENTION,
                  "torch-cudnn": SDPBackend.CUDNN_ATTENTION}
    return {name: _forced(k) for name, k in names.items()}


def _sdpa(q, k, v, is_causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)


def _make(shape, dtype, device):
    return tuple(torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))


def _shapes(device: torch.device, quick: bool):
    """(B, H, T, D, causal): the CPU shape of record, and the GPU one (bf16, D = 128, T = 4096)."""
    if device.type == "cpu":
        return [(4, 8, 1024, 64, True)] if quick else [(4, 8, 1024, 64, True), (4, 8, 1024, 64, False)]
    full = [(2, 16, 4096, 128, True), (2, 16, 4096, 128, False), (4, 16, 2048, 64, True)]
    return full[:1] if quick else full


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    out = []
    for b, h, t, d, causal in _shapes(device, quick):
        impls = {
            f"fastlm-{name}": functools.partial(
                lambda q, k, v, c, be: ops.scaled_dot_product_attention(q, k, v, is_causal=c, backend=be), be=name)
            for name in backends.available(device.type) if name != "torch"
        }
        impls["torch"] = _sdpa
        impls |= _torch_kernels(device)
        impls["naive"] = naive
        impls["torch.compile"] = torch.compile(_sdpa, dynamic=False)
        flops = 4 * b * h * t * t * d * (0.5 if causal else 1.0)
        shape = (b, h, t, d)
        out.append(Case(
            op="attention", name=f"{'causal' if causal else 'full'} {b}x{h}x{t}x{d}", shape=shape, dtype=dtype,
            make=functools.partial(lambda s, c: (*_make(s, dtype, device), c), shape, causal),
            impls=impls, work={"fwd": flops, "bwd": 2.5 * flops, "fwdbwd": 3.5 * flops}, metric="TFLOP/s",
        ))
    out += decode_cases(device, quick)
    return out


# --- decoding ---------------------------------------------------------------------------------


def _decode_make(b, hq, hk, length, d, dtype, device):
    tmax = length
    q = torch.randn(b, hq, 1, d, device=device, dtype=dtype)
    k = torch.randn(b, hk, tmax, d, device=device, dtype=dtype)
    v = torch.randn(b, hk, tmax, d, device=device, dtype=dtype)
    lens = torch.full((b,), length, dtype=torch.int32, device=device)
    return q, k, v, lens


def _decode_torch(q, k, v, lens):
    # What a model without a decode kernel does: plain attention over the (full) valid cache.
    return F.scaled_dot_product_attention(q, k, v, enable_gqa=q.shape[1] != k.shape[1])


def decode_cases(device: torch.device, quick: bool) -> list[Case]:
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    item = torch.finfo(dtype).bits // 8
    b, hq, hk, d = (4, 32, 8, 128) if device.type == "cuda" else (4, 8, 8, 64)
    lengths = (1024, 8192) if quick else (256, 1024, 4096, 16384)
    out = []
    for length in lengths:
        impls = {
            f"fastlm-{name}": functools.partial(
                lambda q, k, v, lens, be: ops.decode_attention(q, k, v, lens, backend=be), be=name)
            for name in backends.available(device.type) if name != "torch"
        }
        impls["torch"] = _decode_torch
        impls["torch.compile"] = torch.compile(_decode_torch, dynamic=False)
        out.append(Case(
            op="attention", name=f"decode {b}x{hq}/{hk}x{length}x{d}", shape=(b, hq, hk, length, d), dtype=dtype,
            make=functools.partial(_decode_make, b, hq, hk, length, d, dtype, device), impls=impls,
            work={"fwd": 2 * b * hk * length * d * item}, metric="GB/s", passes=("fwd",),
        ))
    return out


# --- peak memory against T --------------------------------------------------------------------

_RSS_SCRIPT = textwrap.dedent("""
    import sys, torch, fastlm
    from fastlm.bench.attention import naive
    from fastlm.bench.harness import host_peak_growth
    impl, t, d = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    fns = {"naive": lambda q, k, v: naive(q, k, v, True),
           "torch": lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)}
    fn = fns.get(impl) or (lambda q, k, v: fastlm.ops.scaled_dot_product_attention(
        q, k, v, is_causal=True, backend=impl.removeprefix("fastlm-")))
    small = [torch.randn(1, 1, 128, d, requires_grad=True) for _ in range(3)]
    fn(*small).sum().backward()  # thread pools and their scratch are not what we measure
    q, k, v = (torch.randn(1, 1, t, d, requires_grad=True) for _ in range(3))
    print(host_peak_growth(lambda: fn(q, k, v).sum().backward()))
""")


def _peak_cpu(impl: str, t: int, d: int) -> float:
    res = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, impl, str(t), str(d)], capture_output=True, text=True)
    return float(res.stdout.split()[-1]) if res.returncode == 0 else math.nan


def _peak_cuda(impl: str, t: int, d: int, dtype) -> float:
    fn = {"naive": lambda q, k, v: naive(q, k, v, True), "torch": lambda q, k, v: _sdpa(q, k, v, True)}.get(impl)
    if fn is None:
        be = impl.removeprefix("fastlm-")
        fn = lambda q, k, v: ops.scaled_dot_product_attention(q, k, v, is_causal=True, backend=be)
    q, k, v = _make((1, 1, t, d), dtype, torch.device("cuda"))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    try:
        fn(q, k, v).sum().backward()
    except torch.OutOfMemoryError:
        return math.nan
    torch.cuda.synchronize()
    return float(torch.cuda.max_memory_allocated() - base)


def extra(device: torch.device, quick: bool) -> dict:
    """Extra peak memory of causal forward+backward at B = H = 1, D = 64, against T."""
    lengths = (1024, 4096, 8192) if quick else (1024, 2048, 4096, 8192, 16384)
    impls = [f"fastlm-{b}" for b in backends.available(device.type) if b != "torch"] + ["torch", "naive"]
    table = {}
    for impl in impls:
        table[impl] = {}
        for t in lengths:
            if device.type == "cpu":
                table[impl][t] = _peak_cpu(impl, t, 64)
            else:
                table[impl][t] = _peak_cuda(impl, t, 64, torch.bfloat16)
    print("peak extra memory of causal fwd+bwd, B = H = 1, D = 64 (MiB; inputs excluded):")
    print(f"{'impl':<16}" + "".join(f"{'T=' + str(t):>11}" for t in lengths))
    for impl, row in table.items():
        print(f"{impl:<16}" + "".join(f"{row[t] / 2**20:>11.1f}" for t in lengths))
    return {"peak_extra_bytes_fwdbwd_causal": table, "B": 1, "H": 1, "D": 64}
