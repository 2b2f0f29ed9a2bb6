"""Everything that turns a config into a training run: parsing, start-up checks, building,
checkpoints, distributed and precision helpers, validation, the model card and hub push."""
