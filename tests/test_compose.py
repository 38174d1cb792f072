"""The production topology files: docker-compose (structure, and `config` where the CLI exists), PM2."""

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ENV = {"SYNTH_REDIS_PASSWORD": "test-password", "SYNTH_FLOWER_PASSWORD": "flower-password", "PATH": "/usr/bin:/bin"}


def compose() -> dict:  # type: ignore[type-arg]
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_services_and_safety_properties() -> None:
    spec = compose()
    services = spec["services"]
    assert set(services) == {"redis", "miner", "worker-gpu0", "worker-cpu", "beat", "flower"}
    redis = services["redis"]
    assert "--requirepass" in redis["command"] and "noeviction" in redis["command"]
    assert "ports" not in redis, "Redis must not be published outside the internal network"
    assert spec["networks"]["internal"]["internal"] is True
    gpu = services["worker-gpu0"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"] and "infer.hf,infer.lf" in services["worker-gpu0"]["command"]
    assert "cpu" in services["worker-cpu"]["command"]
    assert "stop_grace_period" in services["worker-cpu"]  # jobs in flight get more than Docker's 10 s
    assert "--basic-auth" not in str(services["flower"]) and "SYNTH_FLOWER_PASSWORD" in services["flower"]["environment"]
    for name in ("redis", "miner", "worker-gpu0", "worker-cpu", "flower"):
        assert "healthcheck" in services[name], name
    assert services["redis"]["restart"] == "unless-stopped"


def test_each_gpu_worker_owns_its_own_gpu() -> None:
    """`count: 1` with --scale gives every replica the same GPU (docker/compose#11863): one service per
    GPU, each naming its device."""
    services = compose()["services"]
    owned = []
    for name, service in services.items():
        devices = service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])
        for device in devices:
            assert "count" not in device and len(device["device_ids"]) == 1, name
            assert name.startswith("worker-gpu"), f"{name} reserves a GPU"
            owned += device["device_ids"]
    assert owned and len(owned) == len(set(owned)), owned


def compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_compose_config_validates(tmp_path: Path) -> None:
    cli = compose_cli()
    if cli is None:
        pytest.skip("docker compose CLI not installed here: `docker compose config` not run "
                    "(install docker-compose-plugin or docker-compose to run this check)")
    (tmp_path / ".env").write_text("SYNTH_REDIS_PASSWORD=test-password\n")
    result = subprocess.run([*cli, "--project-directory", str(tmp_path), "-f", str(ROOT / "docker-compose.yml"),
                             "--env-file", str(tmp_path / ".env"), "config", "-q"],
                            capture_output=True, text=True, env=ENV, cwd=tmp_path)
    assert result.returncode == 0, result.stderr


def test_compose_refuses_to_run_without_a_redis_password(tmp_path: Path) -> None:
    cli = compose_cli()
    if cli is None:
        pytest.skip("docker compose CLI not installed here")
    result = subprocess.run([*cli, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"], capture_output=True,
                            text=True, env={"PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    assert result.returncode != 0 and "SYNTH_REDIS_PASSWORD" in result.stderr + result.stdout


def test_pm2_ecosystem_lists_the_same_processes() -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node not installed: PM2 ecosystem file not evaluated")
    out = subprocess.run([node, "-e", "console.log(require('./ecosystem.config.js').apps.map(a => a.name).join(','))"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip().split(",")
    assert {"synth-miner", "synth-worker-gpu0", "synth-worker-cpu", "synth-beat", "synth-flower"} <= set(out)


def test_pm2_cpu_worker_sees_no_gpu() -> None:
    """With SYNTH_DEVICE=auto the cpu worker would load its models onto GPU 0, beside an inference worker."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node not installed: PM2 ecosystem file not evaluated")
    script = ("const a = require('./ecosystem.config.js').apps; console.log(JSON.stringify(Object.fromEntries("
              "a.map(x => [x.name, x.env.CUDA_VISIBLE_DEVICES ?? null]))))")
    seen = json.loads(subprocess.run([node, "-e", script], cwd=ROOT, capture_output=True, text=True,
                                     check=True).stdout)
    assert seen["synth-worker-cpu"] == "" and seen["synth-worker-gpu0"] == "0", seen
