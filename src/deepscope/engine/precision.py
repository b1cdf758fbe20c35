"""Which floating-point precision a run computes in, decided by what the hardware does natively.

Mixed precision only pays where the hardware has bf16 or fp16 arithmetic: CUDA GPUs, and CPUs with AVX-512 BF16
(or AMX) for bf16 and AVX-512 FP16 / AMX-FP16 for fp16. Elsewhere PyTorch's CPU autocast still works but emulates
the low-precision kernels: a training step 9-12x slower than float32 on an AVX2-only processor
(``benchmarks/bench_precision.py``). So ``auto``
asks the processor once and picks float32 there; an explicit ``bf16``/``fp16`` is honoured but warned about.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import dataclass

import torch

from deepscope.config import AMP_MODES
from deepscope.errors import DeepscopeError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    """The autocast dtype of a run (None: float32), and why it was chosen, for the run log and metrics.json."""

    mode: str  # what was asked: auto | off | bf16 | fp16
    dtype: torch.dtype | None
    reason: str
    warning: str | None = None  # set when the asked precision is emulated (slow) on this device

    @property
    def name(self) -> str:
        return {None: "float32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    def autocast(self, device: torch.device) -> torch.autocast:
        return torch.autocast(device.type, dtype=self.dtype or torch.bfloat16, enabled=self.dtype is not None)

    def summary(self) -> dict[str, str]:
        return {"mode": self.mode, "dtype": self.name, "reason": self.reason}


def _is_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i386", "i686", "x86")


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@functools.cache
def cpu_native_bf16() -> bool:
    """True where the CPU computes bf16 in hardware: AVX-512 BF16 (or AMX) on x86, the BF16 extension on Arm.

    oneDNN's own check (``torch.ops.mkldnn._is_mkldnn_bf16_supported``) also says yes for plain AVX-512, where bf16
    is emulated and no faster than float32, so on x86 the AVX-512 BF16 instruction set is asked for by name, and
    only while PyTorch dispatches AVX-512 kernels: ``ATEN_CPU_CAPABILITY=avx2`` (with ``ONEDNN_MAX_CPU_ISA=AVX2``)
    makes an AVX-512 machine compute as an AVX2 one, and then bf16 is emulated there too.
    """
    if _is_x86():
        if not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
            return False
        probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
        return bool(probe()) if probe is not None else bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


@functools.cache
def cpu_native_fp16() -> bool:
    """True where the CPU computes fp16 in hardware (AVX-512 FP16 or AMX-FP16 on x86, FP16 arithmetic on Arm)."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_fp16_supported())


def cpu_description() -> str:
    """The processor's vector capability and native low-precision support, e.g. 'AVX2, no native bf16'."""
    capability = torch.backends.cpu.get_cpu_capability()
    native = [name for name, has in (("bf16", cpu_native_bf16()), ("fp16", cpu_native_fp16())) if has]
    return f"{capability}, native {' and '.join(native)}" if native else f"{capability}, no native bf16"


def resolve_precision(mode: str, device: torch.device) -> Precision:
    """The precision for ``mode`` on ``device``: ``auto`` takes bf16/fp16 only where the hardware runs it natively."""
    if mode not in AMP_MODES:
        raise DeepscopeError(f"unknown amp mode {mode!r}; choose {', '.join(AMP_MODES)}")
    if mode == "off":
        return Precision(mode, None, "amp off: float32 as asked")
    if device.type != "cpu":
        if mode != "auto":
            return Precision(mode, DTYPES[mode], f"{mode} as asked")
        if device.type != "cuda":
            return Precision(mode, None, f"auto: float32 on {device.type}")
        if torch.cuda.is_bf16_supported():
            return Precision(mode, torch.bfloat16, "auto: the GPU supports bf16")
        return Precision(mode, torch.float16, "auto: the GPU lacks bf16, fp16 with loss scaling")
    cpu = cpu_description()
    if mode == "auto":
        if cpu_native_bf16():
            return Precision(mode, torch.bfloat16, f"auto: the CPU ({cpu}) computes bf16 natively")
        return Precision(mode, None, f"auto: float32, the CPU ({cpu}) would only emulate bf16")
    native = cpu_native_bf16() if mode == "bf16" else cpu_native_fp16()
    if native:
        return Precision(mode, DTYPES[mode], f"{mode} as asked; the CPU ({cpu}) computes it natively")
    warning = (
        f"--amp {mode}: this CPU ({cpu}) has no native {mode}, so autocast emulates it and training runs "
        f"many times slower than float32; use --amp auto"
    )
    return Precision(mode, DTYPES[mode], f"{mode} as asked, emulated on this CPU ({cpu})", warning)
