"""Learning-rate schedule of the expert optimiser."""

from __future__ import annotations

import math


def cosine_lr(step: int, total_steps: int, lr: float, min_lr: float) -> float:
    """Cosine decay from `lr` at step 0 to `min_lr` at `total_steps`, no warm-up (DESIGN §1).

    The schedule spans all local steps of all rounds, so a device's learning rate keeps
    decaying across rounds; past `total_steps` it stays at `min_lr`.
    """
    if total_steps <= 0 or step >= total_steps:
        return min_lr
    progress = step / total_steps
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))
