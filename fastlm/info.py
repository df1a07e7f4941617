"""What fastlm finds on this machine: versions, built extension, backends, devices, CPU features."""

from __future__ import annotations

import os
import platform
import re

import torch

from fastlm import backends

CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [f for f in CPU_FLAGS if f in have]
    except OSError:
        pass
    return []


def machine_name(device: torch.device) -> str:
    """A file-name-safe name for results: the GPU's name, or the CPU's with its thread count."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu {cpu_model()} {torch.get_num_threads()}t"
    name = re.sub(r"\((r|tm)\)|processor|\d+-core", "", name, flags=re.I)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def versions() -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    from fastlm import __version__

    return {
        "fastlm": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
    }


def quant_isa() -> str | None:
    """The instruction set the CPU's integer quantized matmul runs (None without the extension)."""
    return backends.quant_isa()


def summary(device: torch.device) -> dict:
    d = {**versions(), "cpu": cpu_model(), "cpu_threads": torch.get_num_threads(), "cpu_flags": cpu_flags(),
         "quant_isa": quant_isa()}
    if device.type == "cuda":
        d["gpu"] = torch.cuda.get_device_name(device)
    return d


def report() -> str:
    v = versions()
    lines = [
        f"fastlm {v['fastlm']}",
        f"python {v['python']}, torch {v['torch']} (CUDA {v['torch_cuda'] or 'none'}), "
        f"triton {v['triton'] or 'not installed'}",
    ]
    err = backends.extension_error()
    if err:
        lines.append(f"extension: not loaded: {err}")
    else:
        path, info = backends.extension_info()
        cuda = "CUDA kernels" if backends.extension_has_cuda() else "no CUDA kernels"
        why = f": {info['cuda_why']}" if info and info.get("cuda_why") else ""
        built = f", built for torch {info['torch']}" if info else ""
        lines.append(f"extension: {path} loaded (CPU kernels, {cuda}{why}{built})")
    lines.append(f"cpu: {cpu_model()}, {torch.get_num_threads()} threads, features: {' '.join(cpu_flags())}")
    if (isa := quant_isa()) is not None:
        lines.append(f"quantized matmul on cpu: act_quant=True runs {isa} integer dot products "
                     f"(x to int8 per block of 32); act_quant=False runs AVX2 float")
    if torch.cuda.is_available():
        gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        lines.append(f"cuda: {', '.join(gpus)}")
    else:
        lines.append("cuda: no CUDA device visible to torch")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    lines.append("backends:")
    for b in backends.BACKENDS:
        for dev in devices:
            why = backends.why_unavailable(b, dev)
            lines.append(f"  {b:<7} on {dev:<5} {'yes' if why is None else 'no: ' + why}")
    for dev in devices:
        try:
            lines.append(f"backend used on {dev}: {backends.choose('info', torch.device(dev))}")
        except backends.BackendUnavailable as e:
            lines.append(f"backend used on {dev}: none: {e}")
    if os.environ.get("FASTLM_BACKEND"):
        lines.append(f"FASTLM_BACKEND={os.environ['FASTLM_BACKEND']}")
    return "\n".join(lines)
