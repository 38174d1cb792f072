// PM2 alternative to docker-compose: the same processes on one host.
//   cp .env.example .env   # the same file docker-compose reads: SYNTH_REDIS_PASSWORD, SYNTH_FLOWER_PASSWORD...
//   pm2 start ecosystem.config.js && pm2 save
// Needs a local redis-server with a password (requirepass) and maxmemory-policy noeviction.
const fs = require("fs");
const path = require("path");

// Every process runs in this folder: Settings reads ./.env, and data/, artifacts/ and beat's state
// file are relative to it (PM2 would otherwise start them wherever `pm2 start` was typed).
const cwd = __dirname;

// The .env beside this file, as Settings reads it (KEY=VALUE, # comments, optional quotes). Values set
// here for every process would otherwise beat it: environment variables come before .env in Settings.
function readDotEnv(file) {
  const values = {};
  if (!fs.existsSync(file)) return values;
  for (const raw of fs.readFileSync(file, "utf8").split(/\r?\n/)) {
    const line = raw.trim().replace(/^export\s+/, "");
    const eq = line.indexOf("=");
    if (!line || line.startsWith("#") || eq < 1) continue;
    let value = line.slice(eq + 1).trim();
    const quoted = value.match(/^(["'])(.*)\1$/);
    value = quoted ? quoted[2] : value.replace(/\s+#.*$/, "");
    values[line.slice(0, eq).trim()] = value;
  }
  return values;
}

// Precedence as in Settings and docker-compose: the shell, then .env, then Settings' own defaults.
const dotenv = readDotEnv(path.join(cwd, ".env"));
const setting = (key, fallback) => process.env[key] ?? dotenv[key] ?? fallback;

// The Redis URL as docker-compose builds it from SYNTH_REDIS_PASSWORD, but on this host.
const redisPassword = setting("SYNTH_REDIS_PASSWORD");
const redisUrl = setting("SYNTH_REDIS_URL",
  redisPassword ? `redis://:${encodeURIComponent(redisPassword)}@127.0.0.1:6379/0` : undefined);
if (!redisUrl) {
  // Without it the miner would quietly run its embedded pool while every worker refused to start.
  throw new Error("set SYNTH_REDIS_URL (redis://:PASSWORD@127.0.0.1:6379/0) or SYNTH_REDIS_PASSWORD, "
    + "in the environment or in .env beside ecosystem.config.js");
}
const env = { SYNTH_REDIS_URL: redisUrl };
// Only what the shell or .env gives: a fallback of this file's (a wallet named "miner" where Settings says
// "default") made PM2 serve another wallet than docker-compose from the same .env. Unset, Settings applies
// its own default, as in the containers.
for (const key of ["SYNTH_WALLET_NAME", "SYNTH_WALLET_HOTKEY", "SYNTH_ENGINE"]) {
  const value = setting(key);
  if (value !== undefined) env[key] = value;
}
const flowerPassword = setting("SYNTH_FLOWER_PASSWORD");
if (flowerPassword) env.SYNTH_FLOWER_PASSWORD = flowerPassword;  // unset: Flower refuses to start
// No GPU for the processes that docker-compose gives none: the miner, beat and Flower load no model.
const noGpu = { ...env, CUDA_VISIBLE_DEVICES: "" };
const bin = path.join(cwd, ".venv/bin/synth-miner");

// One inference worker per GPU, pinned with CUDA_VISIBLE_DEVICES.
const gpus = setting("SYNTH_GPUS", "0").split(",").filter((g) => g !== "");
// Their metrics: each container of docker-compose has the port to itself, but here they share one host, and
// every worker read the same SYNTH_WORKER_METRICS_PORT from .env: only the first served. The worker of the
// i-th GPU listed serves on that port + i.
const metricsBase = Number.parseInt(setting("SYNTH_WORKER_METRICS_PORT", ""), 10);
const metricsPort = (i) => (metricsBase > 0 ? { SYNTH_WORKER_METRICS_PORT: String(metricsBase + i) } : {});
const gpuWorkers = gpus.map((gpu, i) => ({
  name: `synth-worker-gpu${gpu}`,
  script: bin,
  args: `worker --queues infer.hf,infer.lf --concurrency 1 --pool prefork --hostname gpu${gpu}@%h`,
  interpreter: "none",
  cwd,
  env: { ...env, CUDA_VISIBLE_DEVICES: gpu, ...metricsPort(i) },
  // PM2's default 1.6 s before SIGKILL would cut a forecast in flight (up to SYNTH_MAX_WAIT_S).
  kill_timeout: 60000,
  max_restarts: 50,
  restart_delay: 2000,
}));

module.exports = {
  apps: [
    // kill_timeout: the miner answers its requests in flight before it exits (SYNTH_SHUTDOWN_GRACE_S).
    { name: "synth-miner", script: bin, args: "serve --port 8091 --metrics-port 9100", interpreter: "none",
      cwd, env: noGpu, kill_timeout: 60000, max_restarts: 50, restart_delay: 2000 },
    ...gpuWorkers,
    // No GPU for the cpu worker: with SYNTH_DEVICE=auto it would otherwise take GPU 0 from an inference worker.
    // kill_timeout as docker-compose's stop_grace_period: a refresh or compaction in flight may end.
    { name: "synth-worker-cpu", script: bin,
      args: "worker --queues cpu --concurrency 2 --pool prefork --hostname cpu@%h", interpreter: "none", cwd,
      env: noGpu, kill_timeout: 300000, max_restarts: 50, restart_delay: 2000 },
    { name: "synth-beat", script: bin, args: "beat", interpreter: "none", cwd, env: noGpu, max_restarts: 50,
      restart_delay: 5000 },
    { name: "synth-flower", script: bin, args: "flower --port 5555", interpreter: "none", cwd, env: noGpu,
      max_restarts: 10, restart_delay: 5000 },
  ],
};
