"""Dtype choice per device (minilora/device.py): bf16 only where the hardware computes it fast."""

from __future__ import annotations

import pytest
import torch

from minilora.device import cpu_has_fast_bf16, cpu_has_fast_int8, pick_device, pick_dtype

CPU = torch.device("cpu")


@pytest.mark.parametrize("amx, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_cpu_default_is_bf16_only_with_amx_tiles(monkeypatch, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    # AVX512-BF16 without AMX is not enough: torch's bf16 matmul ran at half the fp32 rate there
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert cpu_has_fast_bf16() is amx
    assert pick_dtype(CPU) is expected


def test_cpu_without_the_amx_query_falls_back_to_fp32(monkeypatch):
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert pick_dtype(CPU) is torch.float32


@pytest.mark.parametrize("vnni, amx, expected", [(True, False, True), (False, True, True), (False, False, False),
                                                  (None, None, False)])
def test_fast_int8_needs_vnni_or_amx(monkeypatch, vnni, amx, expected):
    for name, value in (("_is_vnni_supported", vnni), ("_is_amx_tile_supported", amx)):
        if value is None:  # an older torch without the query
            monkeypatch.delattr(torch.cpu, name, raising=False)
        else:
            monkeypatch.setattr(torch.cpu, name, lambda value=value: value, raising=False)
    assert cpu_has_fast_int8() is expected


def test_an_explicit_dtype_wins_over_the_hardware(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert pick_dtype(CPU, "fp32") is torch.float32
    assert pick_dtype(CPU, "bfloat16") is torch.bfloat16


@pytest.mark.parametrize("name, message", [("fp16", "overflows in fp16"), ("int8", "expected auto, fp32 or bf16")])
def test_unsupported_dtypes_are_refused_with_the_reason(name, message):
    with pytest.raises(ValueError, match=message):
        pick_dtype(CPU, name)


@pytest.mark.parametrize("name", ["mps", "meta", "garbage", "CPU", "cpu:0", "cuda:x", "cuda:-1"])
def test_devices_outside_auto_cpu_cuda_are_refused_by_name(name):
    with pytest.raises(ValueError, match=rf"--device '{name}': expected auto, cpu, cuda or cuda:N"):
        pick_device(name)


def test_cuda_devices_are_checked_against_the_machine(monkeypatch):
    assert pick_device("cpu") == CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--device cuda: CUDA is not available"):
        pick_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"--device cuda:2: this machine has 2 CUDA device\(s\)"):
        pick_device("cuda:2")
