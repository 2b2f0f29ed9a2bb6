"""The maths between a model and a loss: noise schedules, timestep/sigma draws, noisy inputs,
targets and per-sample errors (epsilon/v models and flow matching)."""
