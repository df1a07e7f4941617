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


def case_group(name: str) -> str:
    """A case's family by default: its name's first word ("layer_norm 8192x768" -> "layer_norm",
    "int4/128 asym M=1 (7.1x)" -> "int4/128", "decode 4x8/8x256x64" -> "decode")."""
    return name.split(maxsplit=1)[0] if name.strip() else name


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
    # Competitors that move different amounts (a quantized weight against a dense one) each
    # get their own: impl -> pass -> bytes or FLOPs. Impls not named here use `work`.
    impl_work: dict[str, dict[str, float]] | None = None
    # Calls per competitor per turn (see interleaved_ms); above 1 for ops whose competitors leave
    # very different cache states behind them.
    burst: int = 1
    # The family of shapes this case belongs to, one panel of the plot; default: case_group(name).
    group: str = ""

    def __post_init__(self) -> None:
        self.group = self.group or case_group(self.name)

    def work_of(self, impl: str, pass_: str) -> float:
        return (self.impl_work or {}).get(impl, self.work)[pass_]


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
    group: str = ""             # Case.group


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def once_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call of fn() in milliseconds (CUDA events on a GPU)."""
    if device.type == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def median_ms(fn: Callable[[], object], device: torch.device, *, warmup: int = 3, reps: int = 15) -> float:
    """Median time of fn() in milliseconds, after warm-up."""
    for _ in range(warmup):
        fn()
    sync(device)
    return statistics.median(once_ms(fn, device) for _ in range(reps))


def interleaved_ms(fns: dict[str, Callable[[], object]], device: torch.device, *, warmup: int = 3,
                   reps: int = 15, burst: int = 1) -> dict[str, float]:
    """Median time of each competitor, timed in turns (a, b, c, c, b, a, a, b, c, ...) rather
    than one after another, so that a noisy stretch of the machine hits every competitor alike.
    Every other round runs in reverse, so that no competitor always follows the same other one:
    on the CPU here the quantized GEMV's calls that followed a turn of the dense matmul measured
    about 10% slower than the same calls after a turn of another quantized one, even past the
    first call of a burst; with a fixed order that cost fell on one competitor only.

    With burst > 1 a turn runs a competitor `burst` times in a row and keeps the times of all but
    the first call. That measures the steady state of a stream of like calls, as a model's layers
    run one after another, without the cost of following another competitor whose working set is
    unlike it: on the CPU here a quantized GEMV right after a dense one that streamed 64 MB
    measured 0.4-0.8 ms slower than the quantized calls after it (1.1-1.3 ms)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns.items())
    for rep in range(reps):
        for name, fn in order if rep % 2 == 0 else order[::-1]:
            turn = [once_ms(fn, device) for _ in range(burst)]
            times[name] += turn[1:] if burst > 1 else turn
    return {name: statistics.median(t) for name, t in times.items()}


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
        # mallopt takes a C int: the largest trim threshold it can express is 2 GiB.
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        return False


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def host_peak_growth(fn: Callable[[], object]) -> int:
    """Bytes by which this process's resident set peaked above its level just before fn() (Linux).

    The peak is reset first through /proc/self/clear_refs: getrusage's ru_maxrss cannot be reset
    and a child process even inherits its parent's."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _proc_status_bytes("VmRSS")
    fn()
    return _proc_status_bytes("VmHWM") - before


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

    # An op may return several tensors (rotary: q and k); each gets its own gradient.
    def outputs(out) -> tuple:
        return out if isinstance(out, tuple) else (out,)

    out = outputs(fn(*inputs))
    dy = tuple(torch.randn_like(o) for o in out)

    def bwd():
        return torch.autograd.grad(out, leaves, dy, retain_graph=True)

    def fwdbwd():
        return torch.autograd.grad(outputs(fn(*inputs)), leaves, dy)

    return {"fwd": fwd, "bwd": bwd, "fwdbwd": fwdbwd}


def run_case(case: Case, device: torch.device, ceiling: float, *, reps: int = 15,
             log: Callable[[str], None] = print) -> list[Row]:
    inputs = case.make()
    fns: dict[str, dict[str, Callable]] = {}
    for impl, fn in case.impls.items():
        try:
            fns[impl] = timers(fn, inputs, device)
        except Exception as e:  # a competitor that cannot run this case is reported, not fatal
            log(f"  {case.name}: {impl} skipped ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    rows: list[Row] = []
    scale = 1e9 if case.metric == "GB/s" else 1e12
    for p in case.passes:
        ms = interleaved_ms({impl: f[p] for impl, f in fns.items()}, device, reps=reps, burst=case.burst)
        for impl, t in ms.items():
            rate = case.work_of(impl, p) / (t * 1e-3) / scale
            rows.append(Row(case.op, case.name, case.shape, str(case.dtype).removeprefix("torch."), p, impl,
                            t, rate, case.metric, 100 * rate / ceiling,
                            vs_eager=ms["torch"] / t if "torch" in ms else None,
                            vs_compile=ms["torch.compile"] / t if "torch.compile" in ms else None,
                            group=case.group))
    del fns
    gc.collect()
    rows.sort(key=lambda r: (list(case.impls).index(r.impl), case.passes.index(r.pass_)))
    return rows


def format_table(rows: list[Row]) -> str:
    head = f"{'case':<26}{'pass':<8}{'impl':<15}{'ms':>10}{'rate':>17}{'% ceil':>8}{'x eager':>9}{'x compile':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        ve = f"{r.vs_eager:.2f}" if r.vs_eager else "-"
        vc = f"{r.vs_compile:.2f}" if r.vs_compile else "-"
        rate = f"{r.rate:.4g} {r.metric}"
        lines.append(f"{r.case:<26}{r.pass_:<8}{r.impl:<15}{r.ms:>10.3f}{rate:>17}{r.pct_ceiling:>7.0f}%{ve:>9}{vc:>10}")
    return "\n".join(lines)


def pytest_benchmark(benchmark, case: Case, impl: str, pass_: str, device: torch.device) -> None:
    """Run one (case, competitor, pass) under pytest-benchmark's `benchmark` fixture."""
    fn = timers(case.impls[impl], case.make(), device)[pass_]

    def run():
        fn()
        sync(device)

    benchmark.extra_info.update(work=case.work_of(impl, pass_), metric=case.metric, dtype=str(case.dtype))
    benchmark(run)
