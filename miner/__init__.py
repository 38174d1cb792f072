"""The asyncio miner process: serves the bittensor axon, queues work, always answers in time."""
