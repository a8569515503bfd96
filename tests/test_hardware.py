"""The one hardware rule (agent/model/hardware.py): bf16 only where it is native, and every
caller (the local engine, vLLM's --dtype, the trainer, doctor) reading it the same way."""

from __future__ import annotations

import pytest

from agent.config import Config
from agent.model import hardware
from agent.model.files import ModelError
from agent.model.hardware import cpu_flags, cpu_has_bf16, pick_device, pick_dtype

SAPPHIRE = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f amx_bf16 amx_tile amx_int8\n"
ZEN4 = "flags\t\t: fpu sse avx2 avx512f avx512_bf16\n"
ZEN3 = "flags\t\t: fpu sse avx2\n"


def test_flags_come_from_the_flags_line():
    assert cpu_flags(ZEN3) == {"fpu", "sse", "avx2"}
    assert cpu_flags("processor\t: 0\n") == set()


def test_bf16_only_where_the_cpu_computes_it():
    assert cpu_has_bf16(SAPPHIRE) and cpu_has_bf16(ZEN4)
    assert not cpu_has_bf16(ZEN3)
    # AMX tiles without amx_bf16 cannot multiply bf16
    assert not cpu_has_bf16("flags : avx512f amx_tile amx_int8\n")


@pytest.mark.parametrize(("cap", "bf16"), [("9.0\n", True), ("8.0\n", True), ("7.5\n", False)])
def test_bf16_on_a_gpu_from_ampere_on(monkeypatch, cap, bf16):
    monkeypatch.setattr(hardware, "_nvidia_smi", lambda *args: cap)
    assert hardware.gpu_has_bf16() is bf16
    assert pick_dtype("auto", "cuda") == ("bfloat16" if bf16 else "float16")


@pytest.mark.parametrize(("cpuinfo", "dtype"), [(ZEN4, "bfloat16"), (ZEN3, "float32")])
def test_inference_serving_and_training_agree_on_one_cpu(monkeypatch, cpuinfo, dtype):
    from agent.serving.vllm import serve_command
    from tuner.schemas import TrainConfig
    from tuner.train import pick_bf16

    monkeypatch.setattr(hardware, "cpu_flags", lambda cpuinfo_=None: cpu_flags(cpuinfo))
    assert pick_dtype("auto", "cpu") == dtype
    assert pick_bf16(TrainConfig(), "cpu") is (dtype == "bfloat16")
    argv, _ = serve_command(
        Config(), python="python", model_dir="m", template="t.jinja", cuda=False
    )
    assert argv[argv.index("--dtype") + 1] == dtype


def test_a_dtype_asked_for_is_kept():
    assert pick_dtype("float16", "cpu") == "float16"
    assert pick_dtype("float32", "cuda") == "float32"


def test_a_missing_gpu_names_the_setting_to_change():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert pick_device("auto") == "cpu"
    with pytest.raises(ModelError, match=r'\[model\] device = "cuda".*"auto" or "cpu"'):
        pick_device("cuda")
    # the trainer names its own setting, a field TrainConfig has
    from tuner.schemas import TrainConfig

    assert "device" in TrainConfig.model_fields
    with pytest.raises(ModelError, match="TrainConfig.device"):
        pick_device("cuda", setting="TrainConfig.device")
