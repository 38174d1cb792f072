"""Celery workers: GPU inference pools and CPU jobs. They meet the miner only in Redis."""
