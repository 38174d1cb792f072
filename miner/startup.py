"""Checks made before the miner loads anything heavy: each failure is one line for the operator.

``StartupError`` carries that line; ``synth-miner serve`` prints it and exits non-zero (a usage
error, exit 2, when it names the option at fault) instead of a traceback.
"""

import logging
import os
import socket
import sys
from pathlib import Path

import bittensor as bt
from bittensor.utils import networking

from core.assets import ASSETS, spec_for_any
from core.csv_history import STEP_SUFFIX, find_file
from core.logs import reason
from core.settings import Settings
from miner.access import MetagraphView

log = logging.getLogger(__name__)


class StartupError(RuntimeError):
    """The miner cannot start as configured. ``option`` names the flag at fault, if one is."""

    def __init__(self, message: str, option: str | None = None) -> None:
        super().__init__(message)
        self.option = option


def check_replay(settings: Settings) -> None:
    """A replayed asset needs a folder holding its price files: without one every request would be
    answered "no price" while the miner looks healthy."""
    replayed = sorted(a for a in ASSETS if settings.provider_for(a) == "replay")
    if not replayed:
        if settings.replay_dir is not None:  # e.g. the workers' .env line: offline prices asked for, live ones read
            log.warning("SYNTH_REPLAY_DIR %s is not replayed: no asset's price provider is 'replay' "
                        "(SYNTH_PRICE_PROVIDER=%s); pass --replay-dir or set SYNTH_PRICE_PROVIDER=replay to replay it",
                        settings.replay_dir, settings.price_provider)
        return
    option = "--replay-dir / SYNTH_REPLAY_DIR"
    folder = settings.replay_dir
    if folder is None:
        raise StartupError("price provider 'replay' needs a folder of price CSVs", option)
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise StartupError(f"replay folder {folder} {what}", option)
    if not any(find_file(folder, asset, step) for asset in replayed for step in STEP_SUFFIX):
        example = spec_for_any("BTC" if "BTC" in replayed else replayed[0]).file_stems[0]
        raise StartupError(f"replay folder {folder} holds no price file for any replayed asset "
                           f"(expected names like {example}_1m.csv.gz or {example}_5m.csv)", option)


def static_metagraph(settings: Settings) -> MetagraphView:
    """The metagraph file's view (empty, unloaded, without one); an unusable file is a usage error."""
    if settings.metagraph_file is None:
        return MetagraphView()
    try:
        return MetagraphView.from_file(settings.metagraph_file)
    except ValueError as exc:
        raise StartupError(str(exc), "--metagraph-file / SYNTH_METAGRAPH_FILE") from None


def load_wallet(settings: Settings) -> "bt.Wallet":
    """The miner's wallet with its hotkey and coldkey (public) read. A local miner creates a
    password-less one if missing; a production miner refuses to start without its keys."""
    wallet = bt.Wallet(name=settings.wallet_name, hotkey=settings.wallet_hotkey, path=settings.wallet_path)
    where = f"wallet {settings.wallet_name!r}, hotkey {settings.wallet_hotkey!r} under {Path(wallet.path)}"
    try:
        present = wallet.hotkey_file.exists_on_device() and wallet.coldkeypub_file.exists_on_device()
        if settings.local and not present:
            # A local miner needs an identity to sign replies, never a funded key.
            wallet.create_if_non_existent(coldkey_use_password=False, hotkey_use_password=False, suppress=True)
        elif not settings.local:
            for kind, keyfile in (("hotkey", wallet.hotkey_file), ("coldkey public key", wallet.coldkeypub_file)):
                if not keyfile.exists_on_device():
                    raise StartupError(f"no {kind} at {keyfile.path} ({where}): create the wallet with btcli or "
                                       "pass --wallet-path / --wallet-name / --wallet-hotkey")
        hotkey_file = wallet.hotkey_file
        if hotkey_file.is_encrypted() and not sys.stdin.isatty() and not os.environ.get(hotkey_file.env_var_name()):
            # bittensor would prompt on a closed stdin and report "Wrong password" for a password never given
            # (it reads one saved in the environment, BT_PW_..., without asking).
            raise StartupError(f"the hotkey at {wallet.hotkey_file.path} is password-protected and there is no "
                               "terminal to ask for it: the miner signs every reply with its hotkey, give it one "
                               "without a password (btcli wallet new_hotkey --no-use-password)")
        # Read both keys now, not in the middle of starting the axon, and keep them: a Wallet built from a
        # path reads its key file again at every ``wallet.hotkey``, and the axon reads it twice per request
        # (verify, sign). Out of file descriptors (held connections) that read failed: every validator got a
        # 500, its request accepted and then refused.
        wallet.unlock_hotkey()
        wallet.unlock_coldkeypub()
        _ = (wallet.hotkey.ss58_address, wallet.coldkeypub.ss58_address)
    except StartupError:
        raise
    except Exception as exc:  # KeyFileError, a permission error, a corrupt key file...
        raise StartupError(f"cannot read {where}: {reason(exc)}") from None
    return wallet


def public_ip() -> str:
    """The address to publish on the chain, looked up as bittensor does (outside web services)."""
    try:
        return str(networking.get_external_ip())
    except Exception as exc:  # ExternalIPNotFound, or anything the lookup raises offline
        raise StartupError(f"cannot determine the public IP ({reason(exc)}): pass --external-ip "
                           "(SYNTH_AXON_EXTERNAL_IP)") from None


def check_port(host: str, port: int, option: str = "--port / SYNTH_AXON_PORT") -> None:
    """The axon's address must be free: bittensor binds it in a thread that dies silently, leaving a
    miner that says it serves while nothing listens. Bound and released here, as uvicorn will bind it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT is no conflict
            probe.bind((host, port))
    except socket.gaierror as exc:  # the host is no address at all: not the port's fault
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror or reason(exc)}",
                           "--host / SYNTH_AXON_HOST") from None
    except OSError as exc:
        raise StartupError(f"cannot listen on {host}:{port}: {exc.strerror or reason(exc)} (another miner "
                           "there? pick a free one)", option) from None


def check_metrics_port(settings: Settings) -> None:
    """The metrics port is bound once the axon serves: taken, the miner used to log "miner serving" and
    then stop on an OSError traceback. Checked with the axon's port, before anything loads."""
    if not settings.metrics_port:
        return
    option = "--metrics-port / SYNTH_METRICS_PORT"
    if settings.metrics_port == settings.axon_port:
        raise StartupError(f"the metrics port {settings.metrics_port} is the axon's port: pick another", option)
    check_port(metrics_host(settings), settings.metrics_port, option)


def metrics_host(settings: Settings) -> str:
    """Where the metrics endpoint listens: loopback for a local miner, every interface in production."""
    return "127.0.0.1" if settings.local else "0.0.0.0"
