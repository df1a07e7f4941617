"""The benchmark harness every op reuses.

An op contributes `Case`s: a way to make inputs, the competing implementations (each fastlm
backend, torch eager, torch.compile of torch eager) and the bytes (or FLOPs) a pass must move.
The harness times forward, backward and forward+backward for each, in one process, and reports
medians, speedups over eager and compile, and the share of the machine's measured ceiling.
"""

from __future__ import annotations

import dataclasses
import gc
import statistics
import time
from collections.abc import Callable

import torch

PASSES = ("fwd", "bwd", "fwdbwd")


@dataclasses.dataclass
class Case:
    op: str                     # "norm", "attention", ...
    name: str                   # e.g. "layer_norm 8192x1024"
    shape: tuple[int, ...]
    dtype: torch.dtype
    make: Callable[[], tuple]   # -> (inputs that need grad..., ) fresh tensors on the device
    impls: dict[str, Callable]  # name -> fn(*inputs) -> tensor
    work: dict[str, float]      # pass -> bytes (metric "GB/s") or FLOPs (metric "TFLOP/s")
    metric: str = "GB/s"
    passes: tuple[str, ...] = PASSES


@dataclasses.dataclass
class Row:
    op: str
    case: str
    shape: tuple[int, ...]
    dtype: str
    pass_: str
    impl: str
    ms: float
    rate: float                 # GB/s or TFLOP/s
    metric: str
    pct_ceiling: float          # rate over the machine's measured ceiling, in percent
    vs_eager: float | None = None
    vs_compile: float | None = None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, reps: int = 15,
              min_time: float = 0.3) -> float:
    """Median wall time of fn() in milliseconds, after warm-up; at least `reps` runs, and more
    until `min_time` seconds have passed, so that fast kernels get enough samples."""
    for _ in range(warmup):
        fn()
    sync(device)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - start < min_time and len(times) < 1000):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def reuse_freed_host_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the kernel.

    By default each CPU tensor of 32 MiB or more is a fresh mmap, and filling it page-faults on
    every 4 KiB page: on small VMs that costs more than the op being measured (a 32 MiB fill
    takes several times longer into fresh pages than into reused ones). Caching allocators
    (jemalloc, tcmalloc), which CPU deployments of torch commonly use, avoid this, and so does
    this setting. It applies to the whole process, so every competitor gets it alike.
    Returns whether it took effect (it does only with glibc)."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 40))
    except (OSError, AttributeError):
        return False


def copy_bandwidth(device: torch.device) -> float:
    """Measured copy bandwidth in GB/s (bytes read + bytes written), over a buffer far larger
    than the last-level cache."""
    n = (1 << 28) if device.type == "cuda" else (1 << 25)  # 1 GiB / 128 MiB of fp32
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), device, reps=10)
    return 2 * n * 4 / (ms * 1e-3) / 1e9


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """Measured dense matmul rate in TFLOP/s at a size that saturates the device."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = median_ms(lambda: a @ b, device, reps=5)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def timers(fn: Callable, inputs: tuple, device: torch.device) -> dict[str, Callable[[], object]]:
    """Closures for each pass. Backward alone reuses one forward graph (retain_graph)."""
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]

    def fwd():
        with torch.no_grad():
            return fn(*inputs)

    out = fn(*inputs)
    dy = torch.randn_like(out)

    def bwd():
        return torch.autograd.grad(out, leaves, dy, retain_graph=True)

    def fwdbwd():
        return torch.autograd.grad(fn(*inputs), leaves, dy)

    return {"fwd": fwd, "bwd": bwd, "fwdbwd": fwdbwd}


def run_case(case: Case, device: torch.device, ceiling: float, *, reps: int = 15,
             log: Callable[[str], None] = print) -> list[Row]:
    rows: list[Row] = []
    inputs = case.make()
    for impl, fn in case.impls.items():
        try:
            fns = timers(fn, inputs, device)
        except Exception as e:  # a competitor that cannot run this case is reported, not fatal
            log(f"  {case.name}: {impl} skipped ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
            continue
        for p in case.passes:
            ms = median_ms(fns[p], device, reps=reps)
            scale = 1e9 if case.metric == "GB/s" else 1e12
            rate = case.work[p] / (ms * 1e-3) / scale
            rows.append(Row(case.op, case.name, case.shape, str(case.dtype).removeprefix("torch."), p, impl,
                            ms, rate, case.metric, 100 * rate / ceiling))
        del fns
        gc.collect()
    for p in case.passes:
        by_impl = {r.impl: r.ms for r in rows if r.pass_ == p}
        for r in rows:
            if r.pass_ == p:
                if "torch" in by_impl:
                    r.vs_eager = by_impl["torch"] / r.ms
                if "torch.compile" in by_impl:
                    r.vs_compile = by_impl["torch.compile"] / r.ms
    return rows


def format_table(rows: list[Row]) -> str:
    head = f"{'case':<26}{'pass':<8}{'impl':<15}{'ms':>9}{'rate':>14}{'% ceil':>8}{'x eager':>9}{'x compile':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        ve = f"{r.vs_eager:.2f}" if r.vs_eager else "-"
        vc = f"{r.vs_compile:.2f}" if r.vs_compile else "-"
        rate = f"{r.rate:.1f} {r.metric}"
        lines.append(f"{r.case:<26}{r.pass_:<8}{r.impl:<15}{r.ms:>9.3f}{rate:>14}{r.pct_ceiling:>7.0f}%{ve:>9}{vc:>10}")
    return "\n".join(lines)


def pytest_benchmark(benchmark, case: Case, impl: str, pass_: str, device: torch.device) -> None:
    """Run one (case, competitor, pass) under pytest-benchmark's `benchmark` fixture."""
    fn = timers(case.impls[impl], case.make(), device)[pass_]

    def run():
        fn()
        sync(device)

    benchmark.extra_info.update(work=case.work[pass_], metric=case.metric, dtype=str(case.dtype))
    benchmark(run)
