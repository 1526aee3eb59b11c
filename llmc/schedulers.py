"""Learning-rate schedules, llm.c's llmc/schedulers.h."""

import math

from llmc.utils import ConfigError

SCHEDULES = ("cosine", "linear", "constant", "wsd")


def get_lr(step, schedule, learning_rate, warmup_iterations, num_iterations, final_learning_rate_frac):
    """llm.c's schedulers.h: linear warmup (step+1)/warmup, then cosine, linear or constant decay
    to learning_rate * final_learning_rate_frac at the last step (wsd: constant, then 1-sqrt decay
    over the last 20%)."""
    min_lr = learning_rate * final_learning_rate_frac
    if schedule == "constant":
        return learning_rate
    if step < warmup_iterations:
        return learning_rate * (step + 1) / warmup_iterations
    if schedule == "wsd":
        decay_start = int(0.8 * num_iterations)
        if step < decay_start:
            return learning_rate
        ratio = (step - decay_start) / max(1, num_iterations - decay_start)
        return min_lr + (1.0 - math.sqrt(ratio)) * (learning_rate - min_lr)
    ratio = (step - warmup_iterations) / max(1, num_iterations - warmup_iterations)
    if schedule == "cosine":
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)
    if schedule == "linear":
        return learning_rate - ratio * (learning_rate - min_lr)
    raise ConfigError(f"unknown learning rate schedule '{schedule}': use cosine, linear, constant or wsd")
