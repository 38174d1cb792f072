// PM2 alternative to docker-compose: the same processes on one host.
//   pm2 start ecosystem.config.js && pm2 save
// Needs a local redis-server with a password (requirepass) and maxmemory-policy noeviction.
const env = {
  SYNTH_REDIS_URL: process.env.SYNTH_REDIS_URL || "redis://:change-me@127.0.0.1:6379/0",
  SYNTH_WALLET_NAME: process.env.SYNTH_WALLET_NAME || "miner",
  SYNTH_WALLET_HOTKEY: process.env.SYNTH_WALLET_HOTKEY || "default",
  SYNTH_ENGINE: process.env.SYNTH_ENGINE || "patchtst",
  SYNTH_FLOWER_PASSWORD: process.env.SYNTH_FLOWER_PASSWORD || "",
};
const bin = ".venv/bin/synth-miner";

// One inference worker per GPU, pinned with CUDA_VISIBLE_DEVICES.
const gpus = (process.env.SYNTH_GPUS || "0").split(",").filter((g) => g !== "");
const gpuWorkers = gpus.map((gpu) => ({
  name: `synth-worker-gpu${gpu}`,
  script: bin,
  args: `worker --queues infer.hf,infer.lf --concurrency 1 --hostname gpu${gpu}@%h`,
  interpreter: "none",
  env: { ...env, CUDA_VISIBLE_DEVICES: gpu },
  max_restarts: 50,
  restart_delay: 2000,
}));

module.exports = {
  apps: [
    { name: "synth-miner", script: bin, args: "serve --port 8091 --metrics-port 9100", interpreter: "none",
      env, max_restarts: 50, restart_delay: 2000 },
    ...gpuWorkers,
    // No GPU for the cpu worker: with SYNTH_DEVICE=auto it would otherwise take GPU 0 from an inference worker.
    { name: "synth-worker-cpu", script: bin, args: "worker --queues cpu --concurrency 2 --hostname cpu@%h",
      interpreter: "none", env: { ...env, CUDA_VISIBLE_DEVICES: "" }, max_restarts: 50, restart_delay: 2000 },
    { name: "synth-beat", script: bin, args: "beat", interpreter: "none", env, max_restarts: 50,
      restart_delay: 5000 },
    { name: "synth-flower", script: bin, args: "flower --port 5555", interpreter: "none", env,
      max_restarts: 10, restart_delay: 5000 },
  ],
};
