"""The turbo engine (models, attention, sampler, video) and the single-GPU scheduler."""
