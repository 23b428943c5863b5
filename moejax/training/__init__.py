"""T5X-style training: train state, train / eval steps, optimizers and schedules, freezing by
logical role, checkpoints, metrics writers."""
