"""Floor 3: the trainer (in small steps), its schedule, optimiser, checkpoints, hooks and loggers, the training
methods, and the recipe that drives a method from data to a saved adapter."""
