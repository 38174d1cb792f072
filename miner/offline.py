"""Keep bittensor from reaching outside hosts when serving locally or in tests."""

from bittensor.utils import networking


def patch_bittensor_networking(ip: str = "127.0.0.1") -> None:
    """bittensor resolves the external IP through public web services; pin it instead."""
    networking.get_external_ip = lambda: ip
