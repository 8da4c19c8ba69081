"""How a run executes on its device: compile or not, the autocast dtype, the Newton-Schulz dtype, the
intra-op thread count, and the CUDA backend switches. Chosen once, from the COMPILE / AUTOCAST settings
and what the hardware can do (read from the CPU's flags, never guessed), and logged with the reason.

Rules for `auto`:
- autocast: bf16 on CUDA and on CPUs with native bf16 matmuls (AVX-512 BF16 or AMX BF16); off (fp32)
  elsewhere, where bf16 is emulated and slower than fp32.
- Newton-Schulz: bf16 where autocast is bf16 (as the reference), else fp32.
- compile: on for CUDA. On CPU, on when the run's training work (ITERATIONS x TRAIN_BATCH_TOKENS x
  training FLOPs per token) is at least COMPILE_MIN_CPU_FLOPS: measured on the bench model (2-core
  AVX-512 BF16 CPU), inductor cuts a bf16 step by about a third and costs 30-90 s to compile, so it
  pays once the eager run would take about 3 minutes; shorter runs (smoke, tests) stay eager.
- threads (CPU): the CPUs this process may use (its affinity mask) less those already busy (the
  1-minute load average), at least 1. Two intra-op threads on two cores that other processes keep
  busy were measured 5.6x slower than one; on an idle machine all cores help. OMP_NUM_THREADS, when
  set, wins. CUDA runs keep torch's default.
- document masking (DOC_MASK): FlashAttention's variable-length kernel on CUDA when it is installed
  (FlashAttention 3's flash_attn_interface first, then flash_attn 2), else SDPA with a block mask.
"""
from __future__ import annotations

import importlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
COMPILE_MIN_CPU_FLOPS = 1e13  # training FLOPs of a run; see the module docstring and docs/core.md
DTYPE_NAMES = {None: "off", torch.bfloat16: "bf16", torch.float32: "fp32"}


def cpu_flags() -> set[str]:
    """The CPU's feature flags: torch's own probe when it has one, else the words of /proc/cpuinfo."""
    probe = getattr(torch.cpu, "get_capabilities", None)
    if probe:
        return {name for name, value in probe().items() if value is True}
    info = Path("/proc/cpuinfo")
    return set(info.read_text().split()) if info.is_file() else set()


def native_bf16(device: torch.device, flags: set[str] | None = None) -> str | None:
    """Why this device runs bf16 matmuls natively ('cuda', 'avx512_bf16', 'amx_bf16'), or None."""
    if device.type == "cuda":
        return "cuda" if torch.cuda.is_bf16_supported() else None
    flags = cpu_flags() if flags is None else flags
    return next((f for f in BF16_CPU_FLAGS if f in flags), None)


@dataclass(frozen=True)
class Execution:
    compile: bool
    autocast: torch.dtype | None
    ns_dtype: torch.dtype
    threads: int  # 0: leave torch's default
    why: dict = field(default_factory=dict)

    def line(self) -> str:
        """`execution:compile=1 reason:... autocast=bf16 reason:avx512_bf16 ns_dtype=bf16 threads=2 reason:...`"""
        return (f"execution:compile={int(self.compile)} reason:{self.why['compile']} autocast="
                f"{DTYPE_NAMES[self.autocast]} reason:{self.why['autocast']} ns_dtype={DTYPE_NAMES[self.ns_dtype]} "
                f"threads={self.threads or torch.get_num_threads()} reason:{self.why['threads']}")


def busy_cpus(interval: float = 0.25) -> float:
    """CPUs other processes keep busy right now (/proc/stat sampled over `interval`); the 1-minute load
    average trails by a minute (a job that just ended still counts), so it is only the fallback."""
    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + (fields[4] if len(fields) > 4 else 0)  # total, idle + iowait
    try:
        (t0, i0), _, (t1, i1) = sample(), time.sleep(interval), sample()
    except (OSError, ValueError, IndexError):
        return os.getloadavg()[0]
    return (os.cpu_count() or 1) * (1 - (i1 - i0) / max(t1 - t0, 1))


def cpu_threads(usable: int, load: float, env: dict) -> tuple[int, str]:
    """(intra-op threads, why) for a CPU run: the usable CPUs less the busy ones, at least 1."""
    if env.get("OMP_NUM_THREADS"):
        return 0, "OMP_NUM_THREADS"
    return max(1, usable - round(load)), f"cpus:{usable}_busy:{load:.1f}"


def plan_execution(compile_mode: str, autocast_mode: str, device: torch.device, *, train_flops: float = 0.0,
                   flags: set[str] | None = None, threads: tuple[int, str] | None = None) -> Execution:
    """The execution of a run on `device` from COMPILE / AUTOCAST ('auto', '1'/'0', 'bf16'/'off');
    train_flops is the run's training work (0 for evaluation only). `threads` overrides the CPU rule."""
    native = native_bf16(device, flags) if autocast_mode == "auto" else None
    autocast = torch.bfloat16 if autocast_mode == "bf16" or native else None
    autocast_why = f"AUTOCAST={autocast_mode}" if autocast_mode != "auto" else native or "no_native_bf16"
    if compile_mode != "auto" or device.type == "cuda":
        use_compile = compile_mode == "1" or compile_mode == "auto"
        compile_why = f"COMPILE={compile_mode}" if compile_mode != "auto" else "cuda"
    else:
        use_compile = train_flops >= COMPILE_MIN_CPU_FLOPS
        compile_why = f"cpu_train_flops:{train_flops:.2e}{'>=' if use_compile else '<'}{COMPILE_MIN_CPU_FLOPS:.0e}"
    if device.type != "cpu":
        threads = (0, "default")
    elif threads is None:
        threads = cpu_threads(len(os.sched_getaffinity(0)), busy_cpus(), os.environ)
    return Execution(use_compile, autocast, autocast or torch.float32, threads[0],
                     {"compile": compile_why, "autocast": autocast_why, "threads": threads[1]})


def apply_execution(ex: Execution, device: torch.device) -> None:
    """Process-wide switches: the intra-op threads; on CUDA, TF32 for fp32 matmuls and flash attention
    first. cuDNN attention is off as in the reference; the memory-efficient kernel stays on because
    document-masked attention needs a mask flash cannot take, and math stays as the last fallback."""
    if ex.threads:
        torch.set_num_threads(ex.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cuda.enable_flash_sdp(True)
        torch.backends.cuda.enable_mem_efficient_sdp(True)
        torch.backends.cuda.enable_cudnn_sdp(False)


VARLEN_MODULES = ("flash_attn_interface", "flash_attn")  # FlashAttention 3, then 2


def flash_varlen_kernel(device: torch.device):
    if device.type != "cuda":
        return None
    for name in VARLEN_MODULES:
        try:
            return importlib.import_module(name).flash_attn_varlen_func
        except (ImportError, AttributeError):
            continue
    return None


def attach_attention_kernel(model, device: torch.device) -> str:
    """Document masking through FlashAttention's varlen kernel where there is one; the choice, for the log."""
    if not model.cfg.doc_mask:
        return "causal"
    kernel = flash_varlen_kernel(device)
    if kernel is None:
        return "sdpa_block_mask"
    model.use_varlen_kernel(kernel)
    return f"flash_varlen:{kernel.__module__}"
