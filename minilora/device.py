"""Device and dtype choice: bf16 where the hardware computes it fast, fp32 elsewhere.

On CPUs bf16 matmuls are fast only with AMX tiles: without AVX512-BF16 they are emulated (~300x
slower than fp32 on an AVX2 EPYC), and with AVX512-BF16 but no AMX torch's bf16 matmul still ran at
0.53x the fp32 rate (2-core Xeon, 2048^3: 165 vs 311 GFLOP/s). So the CPU default is fp32 unless AMX
is there; on CUDA it is bf16 when the GPU supports it. Always overridable.
"""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def pick_device(name: str = "auto") -> torch.device:
    """auto (CUDA when there is one), cpu, cuda or cuda:N; anything else is refused here, before loading."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kind, _, index = name.partition(":")
    if kind not in ("cpu", "cuda") or (index and not index.isdigit()) or (kind == "cpu" and index):
        raise ValueError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    if index and int(index) >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"numbered from 0")
    return torch.device(name)


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU has AMX tiles, where oneDNN runs bf16 matmuls faster than fp32. (torch's
    `get_cpu_capability()` names only the vector width, DEFAULT / AVX2 / AVX512, never AMX.)"""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)  # torch >= 2.3
    return amx is not None and bool(amx())


def cpu_has_fast_int8() -> bool:
    """Whether this CPU has int8 dot-product instructions (AVX512-VNNI or AMX), where `torch._int_mm` runs
    ~4x the fp32 matmul rate (2-core Xeon). Without them (AVX2 alone) it runs near the fp32 rate, and
    int8 inference (`int8.py`) only adds its quantization work."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_vnni_supported", "_is_amx_tile_supported")]
    return any(check is not None and bool(check()) for check in checks)


def pick_dtype(device: torch.device, name: str = "auto") -> torch.dtype:
    """Compute dtype of the frozen base. fp16 is refused: Gemma 3 activations overflow it."""
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"--dtype {name!r}: expected auto, fp32 or bf16")
        if DTYPES[name] is torch.float16:
            raise ValueError("--dtype fp16: Gemma 3 overflows in fp16 (transformers#36822); use bf16 or fp32")
        return DTYPES[name]
    if device.type == "cuda":
        with torch.cuda.device(device):  # the chosen GPU, not the current one
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
