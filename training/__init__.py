"""Phantom trainer: shard loader, training loop, checkpoints, sampling and the Ray Train entry point."""
