"""What this CPU can do for inference: instruction sets, and whether oneDNN runs bf16/fp16 natively.

One place for the facts every engine needs: the fast path picks its kernels by them, bench records them in
its environment block, and commands asked for a precision the CPU only emulates say so in one line.

- Instruction sets come from /proc/cpuinfo's flags (Linux), or from torch.cpu.get_capabilities() where
  that exists (other systems). Reading them needs no torch.
- oneDNN's own answers (`torch.ops.mkldnn._is_mkldnn_bf16_supported` / `_fp16_`) decide whether its bf16/fp16
  primitives run at all: they refuse CPUs without AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT.
- "Native" means hardware dot products in that precision: AVX512-BF16 or AMX-BF16 for bf16, AVX512-FP16
  or AMX-FP16 for fp16. Without them bf16 still runs under oneDNN on AVX-512 (converted to fp32 on the fly,
  about as fast as fp32), and on plain AVX2 PyTorch falls back to reference kernels that are ~10-30x slower
  than fp32.
"""

from __future__ import annotations

import functools
import platform
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# /proc/cpuinfo flag -> the name we report (the ones that change how inference runs)
_FLAGS = {
    "avx": "avx", "avx2": "avx2", "fma": "fma", "f16c": "f16c",
    "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512vl": "avx512vl", "avx512dq": "avx512dq",
    "avx512_vnni": "avx512_vnni", "avx512_bf16": "avx512_bf16", "avx512_fp16": "avx512_fp16",
    "avx_vnni": "avx_vnni", "avx_ne_convert": "avx_ne_convert",
    "amx_tile": "amx_tile", "amx_bf16": "amx_bf16", "amx_fp16": "amx_fp16", "amx_int8": "amx_int8",
    "asimd": "neon", "sve": "sve", "bf16": "arm_bf16",
}
# torch.cpu.get_capabilities() key -> the same names (used where /proc/cpuinfo is absent)
_TORCH_KEYS = {
    "avx": "avx", "avx2": "avx2", "fma3": "fma", "f16c": "f16c", "avx512_f": "avx512f", "avx512_bw": "avx512bw",
    "avx512_vl": "avx512vl", "avx512_dq": "avx512dq", "avx512_vnni": "avx512_vnni", "avx512_bf16": "avx512_bf16",
    "avx512_fp16": "avx512_fp16", "avx_vnni": "avx_vnni", "avx_ne_convert": "avx_ne_convert",
    "amx_tile": "amx_tile", "amx_bf16": "amx_bf16", "amx_fp16": "amx_fp16", "amx_int8": "amx_int8",
}


def read_cpu_flags(cpuinfo: str | None = None) -> tuple[str, ...]:
    """The instruction sets of interest this CPU has, in a fixed order. cpuinfo: /proc/cpuinfo's text
    (read when None). Empty where neither /proc/cpuinfo nor torch can tell."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
            break
    if not flags and not cpuinfo:
        return _flags_from_torch()
    return tuple(name for flag, name in _FLAGS.items() if flag in flags)


def _flags_from_torch() -> tuple[str, ...]:
    try:
        import torch

        found = torch.cpu.get_capabilities()
    except (ImportError, AttributeError, RuntimeError):
        return ()
    return tuple(dict.fromkeys(name for key, name in _TORCH_KEYS.items() if found.get(key)))


@dataclass(frozen=True)
class CpuCapabilities:
    """What the CPU (and this PyTorch build's oneDNN) can do. Plain data: `to_dict()` goes into result files."""

    model: str | None
    architecture: str
    isa: tuple[str, ...]  # instruction sets of interest present (see _FLAGS)
    torch_vector_isa: str | None  # ATen's kernels: "AVX512", "AVX2", "DEFAULT", ...
    onednn: bool  # oneDNN (mkldnn) is built in and usable
    onednn_bf16: bool  # oneDNN runs bf16 primitives on this CPU (natively or by AVX-512 conversion)
    onednn_fp16: bool

    @property
    def native_bf16(self) -> bool:
        """Hardware bf16 dot products: AVX512-BF16 or AMX-BF16."""
        return "avx512_bf16" in self.isa or "amx_bf16" in self.isa

    @property
    def native_fp16(self) -> bool:
        """Hardware fp16 arithmetic: AVX512-FP16 or AMX-FP16."""
        return "avx512_fp16" in self.isa or "amx_fp16" in self.isa

    @property
    def amx(self) -> bool:
        return "amx_tile" in self.isa

    def summary(self) -> str:
        """'AMD EPYC, AVX2, bf16 emulated, fp16 emulated' - one phrase for tables and notes."""
        vector = self.torch_vector_isa or ("AVX512" if "avx512f" in self.isa else "AVX2" if "avx2" in self.isa
                                           else self.architecture)
        extras = [name.upper().replace("_", "-") for name in ("avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16")
                  if name in self.isa]
        return ", ".join([self.model or self.architecture, vector, *extras,
                          f"bf16 {precision_support(self, 'bf16')}", f"fp16 {precision_support(self, 'fp16')}"])

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "isa": list(self.isa), "native_bf16": self.native_bf16,
                "native_fp16": self.native_fp16, "amx": self.amx, "summary": self.summary()}


def precision_support(caps: CpuCapabilities, precision: str) -> str:
    """How the CPU runs `precision`: "native" (hardware dot products), "converted" (oneDNN on AVX-512
    converts to fp32: about fp32's speed) or "emulated" (reference kernels: many times slower than fp32)."""
    if precision == "fp32":
        return "native"
    native = caps.native_bf16 if precision == "bf16" else caps.native_fp16
    onednn = caps.onednn_bf16 if precision == "bf16" else caps.onednn_fp16
    if native:
        return "native"
    return "converted" if onednn else "emulated"


def precision_note(caps: CpuCapabilities, precision: str) -> str | None:
    """One line for a user who asked for `precision` on this CPU, or None where it runs natively."""
    support = precision_support(caps, precision)
    if support == "native":
        return None
    name = caps.model or "this CPU"
    hardware = "AVX512-BF16 or AMX-BF16" if precision == "bf16" else "AVX512-FP16 or AMX-FP16"
    if support == "converted":
        return (f"{precision} on {name} has no {hardware}: oneDNN converts to fp32 on the fly, so expect about "
                "fp32's speed and only bf16's rounding")
    return (f"{precision} is emulated on {name} (no {hardware}, {caps.torch_vector_isa or 'no AVX-512'}): it runs, "
            "but many times slower than fp32")


def cpu_model() -> str | None:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else platform.processor()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


@functools.lru_cache(maxsize=1)
def cpu_capabilities() -> CpuCapabilities:
    """This machine's capabilities (read once per process)."""
    import torch

    onednn = bool(torch.backends.mkldnn.is_available())
    return CpuCapabilities(
        model=cpu_model(),
        architecture=platform.machine(),
        isa=read_cpu_flags(),
        torch_vector_isa=_torch_vector_isa(),
        onednn=onednn,
        onednn_bf16=onednn and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        onednn_fp16=onednn and bool(torch.ops.mkldnn._is_mkldnn_fp16_supported()),
    )


def _torch_vector_isa() -> str | None:
    try:
        import torch

        return str(torch.backends.cpu.get_cpu_capability())
    except (AttributeError, RuntimeError):
        return None
