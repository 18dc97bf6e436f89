"""Tier microbenchmarks with torch: GEMM throughput (TFLOP/s) and memory bandwidth (GB/s) at each power cap.

``orchestrator profile --micro`` runs :func:`run_micro` and writes a cap-curves file (tiers/capcurves.py) that
a fleet's tier names as ``cap_curves``: how a cap slows compute-bound prefill and memory-bound decode.

On a GPU (torch with CUDA): for each cap, highest first, the cap is applied through energy/power.py (holder
``profile``; every limit is restored at the end, also on error), then each kernel runs for ``seconds`` inside
a zeus measurement window, which gives its mean power. Without a GPU, the kernels run on the CPU with torch
CPU: no cap is applied, no power is measured, and the file and the output say the figures are not a GPU's.

Kernels: C = A @ B with n x n matrices (2 n^3 FLOPs; bf16 on GPU, fp32 on CPU) and ``dst.copy_(src)`` over
``mem_bytes`` (2 x bytes moved: read + write). Each is timed ``repeats`` times over ``seconds`` and the
fastest repeat is kept: noise on a shared machine (another process on the core) only ever slows a kernel down.
torch is imported here only (optional extra ``micro``: ``pip install 'conserve[micro]'``).
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from orchestrator.errors import ConfigError
from tiers.capcurves import CapCurves, CapPoint

# CPU defaults: one thread (a shared 2-core box), a GEMM of ~2 GFLOP (n=1024: tens of ms per product on one
# core) and a 64 MiB copy (beyond the last-level cache of the machines we run on).
CPU_GEMM_N = 1024
CPU_MEM_BYTES = 64 * 2**20
# GPU defaults: large enough to saturate an A40/A100/H100 (a bf16 8192^3 GEMM is ~1.1 TFLOP) and to hold the
# power limit for a zeus window of `seconds`.
GPU_GEMM_N = 8192
GPU_MEM_BYTES = 2**30


@dataclass(frozen=True, slots=True)
class MicroSettings:
    caps_w: tuple[float, ...] = ()  # GPU only; highest first. Empty: no cap changed (one point)
    gpu_index: int = 0  # NVML index of the GPU to measure and cap
    seconds: float = 0.25  # per kernel per repeat
    repeats: int = 3
    gemm_n: int | None = None  # None: CPU_GEMM_N / GPU_GEMM_N
    mem_bytes: int | None = None
    threads: int = 1  # CPU threads for torch


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise ConfigError(
            "--micro needs torch. To fix: pip install 'conserve[micro]' (pins torch==2.13.0; on a host "
            "without a GPU install the CPU build)"
        ) from None
    return torch


def _time_kernel(fn: Callable[[], None], sync: Callable[[], None], seconds: float) -> tuple[float, int]:
    """Run ``fn`` repeatedly for about ``seconds``; (elapsed s, iterations)."""
    fn()
    sync()  # warm-up (allocation, kernel selection)
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        if n % 4 == 0 or seconds <= 0:
            sync()
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds:
                return elapsed, n


def measure_kernels(
    torch: Any,
    device: str,
    settings: MicroSettings,
    power: Callable[[Callable[[], Any]], tuple[Any, float | None]],
) -> tuple[float, float, float | None, float | None]:
    """(gemm TFLOP/s, memory GB/s, gemm W, memory W) on ``device``; ``power(run)`` returns (run(), mean W or
    None)."""
    gpu = device.startswith("cuda")
    n = settings.gemm_n or (GPU_GEMM_N if gpu else CPU_GEMM_N)
    dtype = torch.bfloat16 if gpu else torch.float32
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    nbytes = settings.mem_bytes or (GPU_MEM_BYTES if gpu else CPU_MEM_BYTES)
    src = torch.ones(nbytes // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    sync = torch.cuda.synchronize if gpu else (lambda: None)

    def best(fn: Callable[[], None], work: float) -> float:
        return max(work * it / el for el, it in (_time_kernel(fn, sync, settings.seconds)
                                                  for _ in range(settings.repeats)))  # fmt: skip

    gemm, gemm_w = power(lambda: best(lambda: torch.matmul(a, b, out=out), 2.0 * n**3))
    mem, mem_w = power(lambda: best(lambda: dst.copy_(src), 2.0 * src.numel() * 4))
    return gemm / 1e12, mem / 1e9, gemm_w, mem_w


def _no_power(run: Callable[[], Any]) -> tuple[Any, float | None]:
    return run(), None


def run_micro(
    settings: MicroSettings, gpu_name: str | None = None, on_point: Callable[[str], None] = lambda s: None
) -> CapCurves:
    """Measure the kernels at each cap (GPU) or once (CPU) and return the curves (module docstring)."""
    torch = _torch()
    if settings.repeats < 1 or settings.seconds <= 0:
        raise ConfigError("--repeats must be >= 1 and --micro-seconds > 0")
    when = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    base = f"orchestrator profile --micro on host {platform.node()}, torch {torch.__version__}, {when}"
    if not torch.cuda.is_available():
        torch.set_num_threads(settings.threads)
        if settings.caps_w:
            on_point("no GPU: the requested caps are not applied (a CPU has no NVML power limit)")
        gemm, mem, _, _ = measure_kernels(torch, "cpu", settings, _no_power)
        on_point(f"cpu ({settings.threads} thread): GEMM {gemm * 1e3:.1f} GFLOP/s, copy {mem:.2f} GB/s")
        return CapCurves(
            gpu=None, device="cpu", gpu_measured=False, caps_applied=False, power_measured=False,
            source=f"{base}; CPU ({platform.processor() or platform.machine()}, {settings.threads} thread): "
            "NOT a GPU's figures, no power cap applied, power not measured",
            points=(CapPoint(None, gemm, mem),),
            gemm={"n": settings.gemm_n or CPU_GEMM_N, "dtype": "float32"},
            memory={"bytes": settings.mem_bytes or CPU_MEM_BYTES},
        )  # fmt: skip
    return _run_gpu(torch, settings, gpu_name, base, on_point)


def zeus_index(nvml_index: int, visible: str | None = None) -> int:
    """The zeus/CUDA position of NVML GPU ``nvml_index`` under CUDA_VISIBLE_DEVICES (integer lists only)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    if not visible:
        return nvml_index
    try:
        order = [int(v) for v in visible.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(
            f"CUDA_VISIBLE_DEVICES={visible!r} names GPUs by UUID; --micro needs integer indices there (or "
            "unset it)"
        ) from None
    if nvml_index not in order:
        raise ConfigError(f"--gpu-indices {nvml_index}: not in CUDA_VISIBLE_DEVICES={visible!r}")
    return order.index(nvml_index)


def _run_gpu(
    torch: Any, settings: MicroSettings, gpu_name: str | None, base: str, on_point: Callable[[str], None]
) -> CapCurves:  # pragma: no cover - needs a GPU (this project's machines have none)
    from energy.errors import EnergyError
    from energy.power import CapRequest, Holder, NvmlPower, apply_caps, restore_caps

    with NvmlPower() as dev:
        info = dev.gpu(settings.gpu_index)
    # the torch device with that board's UUID (CUDA may order devices otherwise than NVML)
    device = next(
        (f"cuda:{i}" for i in range(torch.cuda.device_count())
         if f"GPU-{torch.cuda.get_device_properties(i).uuid}" == info.uuid),
        None,
    )  # fmt: skip
    if device is None:
        raise ConfigError(f"--gpu-indices {settings.gpu_index} ({info.uuid}) is not visible to torch")
    from zeus.monitor import ZeusMonitor

    monitor = ZeusMonitor(gpu_indices=[zeus_index(info.nvml_index)], cpu_indices=[])

    def power(run: Callable[[], Any]) -> tuple[Any, float | None]:
        monitor.begin_window("micro")
        value = run()
        m = monitor.end_window("micro")
        return value, sum(m.gpu_energy.values()) / m.time if m.time > 0 else None

    holder = Holder.this_process("profile", "orchestrator profile --micro")
    points, applied = [], True
    try:
        for cap in settings.caps_w or (None,):
            if cap is not None:
                res = apply_caps([CapRequest("micro", cap, (info.uuid,))], holder)[-1]
                if not res.status.in_force:
                    raise EnergyError(f"cap {cap:g} W not applied ({res.status}): {res.message}")
            gemm, mem, gw, mw = measure_kernels(torch, device, settings, power)
            on_point(f"cap {cap or info.limit_w:g} W: GEMM {gemm:.1f} TFLOP/s at {gw or 0:.0f} W, "
                     f"copy {mem:.0f} GB/s at {mw or 0:.0f} W")  # fmt: skip
            points.append(CapPoint(cap if cap is not None else info.limit_w, gemm, mem, gw, mw))
            applied = applied and cap is not None
    finally:
        restore_caps(holder)
    return CapCurves(
        gpu=gpu_name or info.name, device="cuda", gpu_measured=True, caps_applied=applied and len(points) > 1,
        power_measured=True, source=f"{base}; GPU {info.name} ({info.uuid}), power from zeus",
        points=tuple(points), gemm={"n": settings.gemm_n or GPU_GEMM_N, "dtype": "bfloat16"},
        memory={"bytes": settings.mem_bytes or GPU_MEM_BYTES},
    )  # fmt: skip


def default_caps(allowed_w: Sequence[float]) -> tuple[float, ...]:
    """The caps to sweep, highest first, without duplicates."""
    return tuple(sorted({float(c) for c in allowed_w}, reverse=True))
