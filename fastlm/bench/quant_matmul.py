"""Benchmark cases for the weight-only quantized linear: y = x W^T, K = N = 4096, M rows of x;
and, in full runs, the four linear layers of a gpt2-preset block (qkv 2304x768, attention output
768x768, MLP 3072x768 and 768x3072) at M = 1 and 16.

A quantized linear layer exists to read fewer weight bytes, so bytes are the metric and copy
bandwidth the ceiling. Each competitor is credited with what it must move:
    dense float       N K s                       (s = 4 for float32, 2 for bfloat16)
    int8              N K + 4 N                   (values, one scale per row)
    int4, group G     N K / 2 + 4 N K / G         (twice the second term with zero points)
    plus, for all     M (K + N) s                 (x in, y out)
Competitors: "torch" is the dense float layer that the quantized one replaces (F.linear with the
float weight), so the table's "x eager" column is the speedup over the dense matmul. The case name
ends with the ideal speedup in parentheses, dense weight bytes over quantized weight bytes:
what a purely memory-bound kernel would gain. The fraction of that ideal reached is "x eager" over it, which is
also the ratio of the two competitors' GB/s. torch's own weight-only kernels run where this
torch has them, for M <= 8: torch._weight_int8pack_mm and, on the CPU,
torch._weight_int4pack_mm_for_cpu (measured 3-40x slower than the dense matmul here).

`extra` (CPU): weight streams at the layer shapes of a 7-8 B model, (N, K) in STREAM_SHAPES, for M
in STREAM_MS, int8 and int4 g32 (float32 and bf16 scales) and int4 g128, each through the float
path and the integer one (act_quant=True) beside the dense float32 matmul; GB/s of weight bytes
against the read bandwidth measured in the same turns (a torch sum over copies of as many bytes
as the int4 g32 weight; a 256 MiB sum before and after too), the ceiling of a kernel that reads
its weights once and writes little. Then one decode-sized call with a core kept busy by another
process (`yes`), where a kernel that waits for every thread it woke loses whole scheduler quanta.

Only the forward pass is timed: the packed weight gets no gradient, and the input gradient is a
dense matmul in torch. Every competitor cycles through enough copies of its weight that together
they exceed the last-level cache three times over, so each call reads its weight from memory, as
a model whose layers each run once per token does. Each turn of the interleaved timing runs a
competitor four times in a row and keeps the last three (harness.interleaved_ms): a model runs
its quantized layers one after another, never right after a dense matmul of the same shape.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import statistics
import subprocess
import time

import torch
import torch.nn.functional as F

from fastlm import backends, ops, quant
from fastlm.bench import harness
from fastlm.bench.harness import Case

K = N = 4096
MS = (1, 2, 4, 8, 16, 32, 64, 128)
QUICK_MS = (1, 16)
# (bits, group_size, symmetric)
CONFIGS = ((8, K, True), (4, 128, True), (4, 128, False))
QUICK_CONFIGS = CONFIGS[:2]
# The four linear layers of a block of the thin model's gpt2 preset, (N, K); full runs only.
MODEL_SHAPES = {"qkv": (2304, 768), "attn-out": (768, 768), "mlp-in": (3072, 768), "mlp-out": (768, 3072)}


def _llc_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20))
    try:  # the largest cache the kernel reports for cpu0
        sizes = []
        for i in itertools.count():
            try:
                with open(f"/sys/devices/system/cpu/cpu0/cache/index{i}/size") as f:
                    text = f.read().strip()
            except OSError:
                break
            mult = {"K": 1 << 10, "M": 1 << 20}.get(text[-1], 1)
            sizes.append(int(text.rstrip("KM")) * mult)
        return max(sizes) if sizes else 32 << 20
    except ValueError:
        return 32 << 20


def _copies(nbytes: int, device: torch.device) -> int:
    return max(2, math.ceil(3 * _llc_bytes(device) / nbytes))


def _clone(v):
    if isinstance(v, torch.Tensor):
        return v.clone()
    if isinstance(v, tuple):
        return tuple(_clone(t) for t in v)
    if isinstance(v, quant.QuantizedWeight):
        return dataclasses.replace(v, qweight=v.qweight.clone(), scales=v.scales.clone(),
                                   zeros=None if v.zeros is None else v.zeros.clone())
    raise TypeError(type(v).__name__)


class _Ring:
    """Copies of one weight (a tensor, a tuple of them or a QuantizedWeight), handed out in turn."""

    def __init__(self, first, nbytes: int, device: torch.device):
        self.items = [first] + [_clone(first) for _ in range(_copies(nbytes, device) - 1)]
        self._next = itertools.cycle(self.items)

    def next(self):
        return next(self._next)


@functools.cache
def _weights(bits: int, group: int, sym: bool, dtype: torch.dtype, device: torch.device, n: int = N, k: int = K):
    """Rings of the (n, k) weight for every competitor, shared by the cases of each M; and the
    quantized weight's bytes."""
    w = torch.randn(n, k, device=device, dtype=torch.float32)
    qw = quant.quantize(w, bits, group, sym)
    rings = {"dense": _Ring(w.to(dtype), n * k * torch.finfo(dtype).bits // 8, device),
             "fastlm": _Ring(qw, qw.nbytes(), device)}
    if bits == 8 and hasattr(torch, "_weight_int8pack_mm"):
        rings["int8pack"] = _Ring((qw.qweight, qw.scales[:, 0].to(dtype).contiguous()), qw.nbytes(), device)
    if bits == 4 and device.type == "cpu" and hasattr(torch, "_weight_int4pack_mm_for_cpu"):
        try:
            q = quant.unpack(qw).to(torch.int32)
            # torch's int4 format: W = (q - 8) * scale + offset, scales and offsets (K / G, N, 2).
            off = torch.zeros_like(qw.scales) if qw.zeros is None else (8 - qw.zeros) * qw.scales
            sz = torch.stack((qw.scales, off), -1).transpose(0, 1).contiguous().to(dtype)
            rings["int4pack"] = _Ring((torch._convert_weight_to_int4pack_for_cpu(q, 1), sz), qw.nbytes(), device)
        except (RuntimeError, NotImplementedError):
            pass
    return rings, qw.nbytes()


def _with_group(packed_and_sz, group):
    packed, sz = packed_and_sz
    return packed, group, sz


def _make(m: int, k: int, dtype: torch.dtype, device: torch.device):
    return (torch.randn(m, k, device=device, dtype=dtype),)


def cases(device: torch.device, quick: bool = False) -> list[Case]:
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    out = []
    for bits, group, sym in QUICK_CONFIGS if quick else CONFIGS:
        out += _cases(device, dtype, bits, group, sym, "", N, K, QUICK_MS if quick else MS)
    if not quick:
        for label, (n, k) in MODEL_SHAPES.items():
            for bits, group, sym in CONFIGS[:2]:
                out += _cases(device, dtype, bits, group, sym, f"gpt2 {label} {n}x{k} ", n, k, (1, 16))
    return out


def _cases(device, dtype, bits, group, sym, prefix, n, k, ms) -> list[Case]:
    s = torch.finfo(dtype).bits // 8
    out = []
    rings, qbytes = _weights(bits, group, sym, dtype, device, n, k)
    kind = "int8" if bits == 8 else f"int4/{group}{'' if sym else ' asym'}"
    ideal = n * k * s / qbytes
    for m in ms:
        impls = {"torch": lambda x, r=rings["dense"]: F.linear(x, r.next())}
        for b in backends.available(device.type):
            if b != "torch":
                impls[f"fastlm-{b}"] = lambda x, r=rings["fastlm"], b=b: ops.quant_linear(x, r.next(), backend=b)
        # torch's packed kernels take seconds a call at large M on the CPU: decode sizes only.
        if "int8pack" in rings and m <= 8:
            impls["torch int8pack"] = lambda x, r=rings["int8pack"]: torch._weight_int8pack_mm(x, *r.next())
        if "int4pack" in rings and m <= 8:
            impls["torch int4pack"] = lambda x, r=rings["int4pack"], g=group: torch._weight_int4pack_mm_for_cpu(
                x, *_with_group(r.next(), g))
        io = m * (k + n) * s
        work = {name: {"fwd": io + (n * k * s if name == "torch" else qbytes)} for name in impls}
        out.append(Case(
            op="quant_matmul", name=f"{prefix}{kind} M={m} ({ideal:.1f}x)", shape=(m, k, n), dtype=dtype,
            make=functools.partial(_make, m, k, dtype, device), impls=impls,
            work={"fwd": io + qbytes}, impl_work=work, passes=("fwd",), burst=4,
        ))
    return out


# --- weight streams against the read bandwidth (extra) ---------------------------------------------

STREAM_SHAPES = ((4096, 4096), (14336, 4096), (4096, 14336))
STREAM_MS = (1, 2, 4, 8, 16, 32, 64)
# label -> (bits, group_size, scale dtype)
STREAM_CONFIGS = {"int8": (8, None, torch.float32), "int4/32": (4, 32, torch.float32),
                  "int4/32 bf16-scales": (4, 32, torch.bfloat16), "int4/128": (4, 128, torch.float32)}


def read_bandwidth(device: torch.device) -> float:
    """GB/s of a sum over 256 MiB of float32: what a kernel that only reads can reach."""
    x = torch.ones(64 << 20, device=device)
    ms = harness.median_ms(lambda: x.sum(), device, reps=10)
    return x.numel() * 4 / (ms * 1e-3) / 1e9


# libgomp's threads spin for several ms after every parallel region (about 10 ms on the hosts
# measured) before they sleep; a fastlm call inside that window finds its pool's helper waiting
# for a core that the spinner holds and runs on one thread. A decode step of the thin model runs
# no OpenMP region, so each turn starts after that window. The wait is a busy one: on an AMD EPYC
# host a 20 ms sleep left the next ten 0.6 ms calls at 1.1 ms each (an idle core comes back
# slowly), a busy wait at 0.8.
_TURN_PAUSE_S = 0.02


def _pause(s: float) -> None:
    t = time.perf_counter()
    while time.perf_counter() - t < s:
        pass


def _turns_ms(fns: dict, reps: int, burst: int = 4, pause_s: float = _TURN_PAUSE_S) -> dict[str, float]:
    """Median ms of each competitor, in turns of `burst` calls keeping all but the first, each
    turn `pause_s` after the last one."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(reps):
        for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
            _pause(pause_s)
            for i in range(burst):
                t = time.perf_counter()
                fns[name]()
                if i:
                    times[name].append((time.perf_counter() - t) * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


READ = "read (fp32 sum)"


def _stream_rows(n: int, k: int, ms, reps: int) -> list[dict]:
    """Rows of (n, k, m, impl, ms, weight_GBps, x_dense, read_GBps, pct_read_bw, pct_best_read):
    read_GBps is the ceiling measured in the same turns, a torch sum over a ring of float32
    tensors of the int4 g32 weight's bytes, since these machines' bandwidth moves by tens of
    percent between runs; pct_best_read is against the better of that and the dense matmul."""
    device = torch.device("cpu")
    w = torch.randn(n, k)
    dense = _Ring(w, n * k * 4, device)
    rows = []
    rings = {}
    for label, (bits, group, sd) in STREAM_CONFIGS.items():
        qw = quant.quantize(w, bits, group or k, True, sd)
        rings[label] = (_Ring(qw, qw.nbytes(), device), qw.nbytes())
    read_bytes = rings["int4/32"][1] // 4 * 4
    reads = _Ring(torch.ones(read_bytes // 4), read_bytes, device)
    for m in ms:
        x = torch.randn(m, k)
        fns = {READ: lambda r=reads: r.next().sum(), "dense fp32": lambda r=dense, x=x: F.linear(x, r.next())}
        for label, (ring, _) in rings.items():
            fns[f"{label} float"] = lambda r=ring, x=x: ops.quant_linear(x, r.next(), backend="cpu")
            fns[f"{label} act_quant"] = lambda r=ring, x=x: ops.quant_linear(x, r.next(), backend="cpu",
                                                                                act_quant=True)
        t = _turns_ms(fns, reps)
        read_gbps = read_bytes / (t[READ] * 1e-3) / 1e9
        # The dense matmul is a read too, and on some hosts (an Intel Xeon here) it reads faster
        # than the sum: the best of the two is the stricter ceiling.
        best_gbps = max(read_gbps, n * k * 4 / (t["dense fp32"] * 1e-3) / 1e9)
        for name, v in t.items():
            if name == READ:
                continue
            label = name.rsplit(" ", 1)[0]
            nbytes = n * k * 4 if name == "dense fp32" else rings[label][1]
            gbps = nbytes / (v * 1e-3) / 1e9
            rows.append({"n": n, "k": k, "m": m, "impl": name, "ms": v, "weight_GBps": gbps,
                         "x_dense": t["dense fp32"] / v, "read_GBps": read_gbps,
                         "pct_read_bw": 100 * gbps / read_gbps, "pct_best_read": 100 * gbps / best_gbps})
    return rows


def busy_core_ms(reps: int = 200) -> dict:
    """A decode-sized call (4096 x 4096 int4 g32, M = 1) with and without a `yes` process keeping
    one core busy: median and 90th percentile ms, float path and integer path."""
    qw = quant.quantize(torch.randn(4096, 4096), 4, 32)
    ring = _Ring(qw, qw.nbytes(), torch.device("cpu"))
    x = torch.randn(1, 4096)
    out = {}
    for busy in (False, True):
        hog = subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) if busy else None
        try:
            for act in (False, True):
                ts = []
                for _ in range(reps):
                    t = time.perf_counter()
                    ops.quant_linear(x, ring.next(), backend="cpu", act_quant=act)
                    ts.append((time.perf_counter() - t) * 1e3)
                ts.sort()
                out[f"{'busy' if busy else 'idle'} {'act_quant' if act else 'float'}"] = {
                    "median_ms": statistics.median(ts), "p90_ms": ts[int(0.9 * len(ts))], "max_ms": ts[-1]}
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()
    return out


def output_errors(n: int = 4096, k: int = 4096, m: int = 16) -> dict:
    """The error of each path against float64, relative (Frobenius norms): against the product
    with the dequantized weight (the path's own error: x's rounding for act_quant) and against
    the float weight (the weight's quantization too). x Gaussian, and Gaussian with 1% of its
    channels 20x larger (the outlier channels of trained LLM activations)."""
    from fastlm import reference as ref

    torch.manual_seed(0)
    w = torch.randn(n, k) / math.sqrt(k)
    x0 = torch.randn(m, k)
    outliers = x0.clone()
    outliers[:, torch.randperm(k)[: k // 100]] *= 20
    out = {}
    for xname, x in (("gaussian", x0), ("outlier channels", outliers)):
        exact = ref.quant_linear(x, w)
        for label, (bits, group, sd) in STREAM_CONFIGS.items():
            qw = quant.quantize(w, bits, group or k, True, sd)
            own = ref.quant_linear(x, quant.dequantize(qw, torch.float64))
            for act in (False, True):
                y = ops.quant_linear(x, qw, backend="cpu", act_quant=act).double()
                out[f"{xname} / {label} / {'act_quant' if act else 'float'}"] = {
                    "vs_dequantized": float((y - own).norm() / own.norm()),
                    "vs_float_weight": float((y - exact).norm() / exact.norm())}
    return out


@torch.no_grad()
def perplexities(ckpt: str, data_dir: str, batches: int = 20, batch_size: int = 8, seed: int = 0) -> dict:
    """Validation perplexity of a trained checkpoint, float and quantized (int8, int4 g32, with
    and without act_quant), on the same batches. act_quant is applied at every M here (the
    integer kernel takes any M; a model call of 8 x 128 tokens would otherwise take the float
    path): the figure is the rounding's effect, not a speed."""
    from fastlm import data, train
    from fastlm.ops import quant_matmul as qm
    from fastlm.patch import quantize_

    variants = {"float": None, "int8": dict(bits=8), "int8 act_quant": dict(bits=8, act_quant=True),
                "int4/32": dict(bits=4, group_size=32),
                "int4/32 act_quant": dict(bits=4, group_size=32, act_quant=True),
                "int4/32 bf16-scales act_quant": dict(bits=4, group_size=32, act_quant=True,
                                                      scale_dtype=torch.bfloat16)}
    tokens = data.load_tokens(data_dir, "val")
    out = {}
    saved, qm.DOT_MAX_M = qm.DOT_MAX_M, 1 << 62
    try:
        for name, args in variants.items():
            model, _ = train.load_model(ckpt, "cpu", backend="cpu")
            if args is not None:
                quantize_(model, **args)
            seq = model.config.block_size
            b = data.TokenBatches(tokens, batch_size, seq, seed=seed)
            total = sum(float(model(*b.next(torch.device("cpu")))[1]) for _ in range(batches))
            out[name] = math.exp(total / batches)
    finally:
        qm.DOT_MAX_M = saved
    return out


def extra(device: torch.device, quick: bool) -> dict:
    if device.type != "cpu" or "cpu" not in backends.available("cpu"):
        return {}
    from fastlm import info

    bw0 = read_bandwidth(device)
    shapes = STREAM_SHAPES[:1] if quick else STREAM_SHAPES
    rows = []
    for n, k in shapes:
        rows += _stream_rows(n, k, (1, 16) if quick else STREAM_MS, 5 if quick else 9)
    bw1 = read_bandwidth(device)
    print(f"read bandwidth (256 MiB fp32 sum): {bw0:.1f} GB/s before, {bw1:.1f} GB/s after; "
          f"integer path: {info.quant_isa()}; % read bw is of the sum timed in the same turns")
    print(f"{'N x K':<12}{'M':>4}  {'impl':<28}{'ms':>9}{'weight GB/s':>13}{'read GB/s':>11}{'% read bw':>11}"
          f"{'% best read':>13}{'x dense':>9}")
    for r in rows:
        print(f"{r['n']}x{r['k']:<7}{r['m']:>4}  {r['impl']:<28}{r['ms']:>9.3f}{r['weight_GBps']:>13.1f}"
              f"{r['read_GBps']:>11.1f}{r['pct_read_bw']:>10.0f}%{r['pct_best_read']:>12.0f}%{r['x_dense']:>9.2f}")
    busy = busy_core_ms(50 if quick else 200)
    print("4096x4096 int4/32 M=1 with one core busy (`yes`), ms:")
    for name, v in busy.items():
        print(f"  {name:<20} median {v['median_ms']:.3f}  p90 {v['p90_ms']:.3f}  max {v['max_ms']:.3f}")
    errors = output_errors(m=4 if quick else 16)
    print("relative error against float64 (||y - y64|| / ||y64||), 4096 x 4096:")
    for name, v in errors.items():
        print(f"  {name:<44} vs dequantized W {v['vs_dequantized']:.2e}  vs float W {v['vs_float_weight']:.2e}")
    return {"read_GBps": {"before": bw0, "after": bw1}, "quant_isa": info.quant_isa(), "streams": rows,
            "busy_core": busy, "output_errors": errors}


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description="perplexity of a checkpoint, float and quantized")
    ap.add_argument("ckpt")
    ap.add_argument("data")
    ap.add_argument("--batches", type=int, default=20)
    a = ap.parse_args()
    for name, ppl in perplexities(a.ckpt, a.data, a.batches).items():
        print(f"{name:<32} perplexity {ppl:.3f}")
