"""Floor 3: the training loop, checkpoints, loggers, and the recipe that drives a training method."""
