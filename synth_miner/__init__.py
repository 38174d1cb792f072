"""Command-line entry point wiring core, miner and workers together."""
