"""Training: config and start-up checks, building a run, the loop's phases, checkpoints."""
