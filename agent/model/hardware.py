"""What the machine has, and the one rule for the device and for bf16.

The rule: bf16 where the hardware computes it natively, fp32 (fp16 on a GPU) elsewhere.

- On a CPU, bf16 pays only with `avx512_bf16` or AMX (`amx_bf16`): elsewhere PyTorch emulates
  it, which is slower than fp32 for inference and fails or crawls in training. `amx_tile`
  alone is not enough: the tiles need `amx_bf16` to multiply bf16.
- On a CUDA GPU, bf16 from compute capability 8.0 (Ampere) on; older GPUs emulate it, and
  inference takes fp16 there instead.

The local engine (`[model] dtype = "auto"`), vLLM's `--dtype`, the trainer's bf16 flag and
`selftune doctor` all ask here, so inference and training agree on one machine.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from agent.model.files import ModelError

BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
BF16_GPU_CAPABILITY = 8.0  # Ampere


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags, from `cpuinfo` (the text of /proc/cpuinfo) or the file itself;
    empty where there is none (not Linux)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """True when the CPU computes bf16 natively (avx512_bf16 or AMX)."""
    return bool(BF16_CPU_FLAGS & cpu_flags(cpuinfo))


def _nvidia_smi(*args: str) -> str | None:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def has_cuda_gpu() -> bool:
    """True when `nvidia-smi -L` lists a GPU (checked without importing torch)."""
    return "GPU" in (_nvidia_smi("-L") or "")


def gpu_has_bf16() -> bool:
    """True when the first CUDA GPU computes bf16 natively. Asked of nvidia-smi first: this
    process's torch may be the CPU wheel while vLLM's own environment drives the GPU."""
    caps = (_nvidia_smi("--query-gpu=compute_cap", "--format=csv,noheader") or "").split()
    try:
        return float(caps[0]) >= BF16_GPU_CAPABILITY
    except (IndexError, ValueError):
        pass
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def supports_bf16(device: str) -> bool:
    """True when bf16 is worth using on `device` ("cpu" or "cuda"): see the module's rule."""
    return gpu_has_bf16() if device == "cuda" else cpu_has_bf16()


def pick_device(requested: str = "auto", *, setting: str = "[model] device") -> str:
    """The torch device for `requested` ("auto", "cpu" or "cuda"): "auto" is the GPU when torch
    sees one. A GPU asked for and not visible is a ModelError naming `setting`."""
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelError(f'{setting} = "cuda" but no CUDA GPU is visible: use "auto" or "cpu"')
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def pick_dtype(requested: str, device: str) -> str:
    """The dtype name ("bfloat16", "float16", "float32") for inference on `device`: `requested`
    unless it is "auto", else bf16 where `supports_bf16`, fp16 on an older GPU, fp32 on a CPU."""
    if requested != "auto":
        return requested
    if supports_bf16(device):
        return "bfloat16"
    return "float16" if device == "cuda" else "float32"
