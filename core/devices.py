"""Where torch work runs: ``auto`` takes the GPU when torch sees one, so one image serves both fleets."""

from typing import Literal, get_args

DeviceChoice = Literal["auto", "cpu", "cuda"]
DEVICE_CHOICES: tuple[str, ...] = get_args(DeviceChoice)


class DeviceError(ValueError):
    """The device asked for does not exist here (unknown name, or cuda without a CUDA device)."""


def resolve_device(choice: str) -> str:
    """``cpu`` or ``cuda`` for a choice; ``cuda`` asked for explicitly fails loudly when absent."""
    import torch  # lazy: settings and the miner import this module without paying for torch

    if choice not in DEVICE_CHOICES:
        raise DeviceError(f"unknown device {choice!r}; use one of {', '.join(DEVICE_CHOICES)}")
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise DeviceError("device cuda asked for, but torch sees no CUDA device")
    return choice
