"""Device choice: auto follows torch, an explicit cuda fails loudly where none exists, typos are refused."""

import pytest
import torch
from pydantic import ValidationError

from core.devices import DeviceError, resolve_device
from core.settings import Settings

HAS_CUDA = torch.cuda.is_available()


def test_auto_follows_torch() -> None:
    assert resolve_device("auto") == ("cuda" if HAS_CUDA else "cpu")
    assert resolve_device("cpu") == "cpu"


@pytest.mark.skipif(HAS_CUDA, reason="this machine has a CUDA device")
def test_explicit_cuda_without_a_gpu_is_an_error() -> None:
    with pytest.raises(DeviceError, match="no CUDA device"):
        resolve_device("cuda")


def test_unknown_device_is_refused_by_name() -> None:
    with pytest.raises(DeviceError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")


def test_settings_read_the_device_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().device == "auto"
    monkeypatch.setenv("SYNTH_DEVICE", "cpu")
    assert Settings().device == "cpu"
    monkeypatch.setenv("SYNTH_DEVICE", "tpu")
    with pytest.raises(ValidationError, match="device"):
        Settings()


@pytest.mark.skipif(HAS_CUDA, reason="this machine has a CUDA device")
def test_engines_fall_back_loudly_when_the_named_device_is_missing(caplog: pytest.LogCaptureFixture) -> None:
    from core.engines_registry import build_engines

    engines = build_engines(Settings(device="cuda"))
    assert "patchtst" not in engines and {"ewma_t", "gbm"} <= set(engines)
    assert any(r.levelname == "WARNING" and "no CUDA device" in r.getMessage() for r in caplog.records)
    assert "patchtst" in build_engines(Settings(device="auto"))
