"""Domain core of synth-miner: knows nothing of Celery or bittensor."""

__version__ = "0.1.0"
