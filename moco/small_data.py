"""Guard rails for MoCo on small datasets.

Two settings that are right for ImageNet stop MoCo from learning on a few thousand
images: a queue that holds a large share of the dataset (each image then meets its own
older keys as negatives, so the contrastive task turns against itself), and a key
momentum so slow that the key encoder is still mostly its random initialisation when the
run ends. The warnings say so before training, with the value that fits.
"""
from typing import Optional

import numpy as np

QUEUE_SHARE = 0.1  # the queue should hold at most this share of the dataset
INIT_SHARE = 0.5  # the key encoder should keep at most this share of its initialisation


def init_share_at_end(m: float, steps: int, cosine: bool = False) -> float:
    """How much of its initial weights (a random draw, or --init's) the key encoder still
    holds after `steps` momentum updates (the product of the momenta); with `cosine`, under
    common/train/schedule.py's cosine_momentum."""
    if not cosine:
        return m ** steps
    t = np.arange(steps) / steps  # cosine_momentum at every step, vectorised (runs have millions of steps)
    return float(np.exp(np.log1p(-(1.0 - m) * (np.cos(np.pi * t) + 1.0) / 2.0).sum()))


def fitted_queue(num_images: int, keys_per_step: int, cap: Optional[int] = 4096) -> int:
    """The largest --moco-k that is a multiple of the keys enqueued per step and at most
    QUEUE_SHARE of the images (and `cap`); at least one step's keys."""
    limit = int(QUEUE_SHARE * num_images) if cap is None else min(cap, int(QUEUE_SHARE * num_images))
    return max(keys_per_step, limit // keys_per_step * keys_per_step)


def queue_warning(K: int, num_images: int, keys_per_step: int) -> Optional[str]:
    """A sentence when the queue holds more than QUEUE_SHARE of the dataset, with the
    largest --moco-k (a multiple of the keys enqueued per step) that fits."""
    if K <= QUEUE_SHARE * num_images:
        return None
    fit = fitted_queue(num_images, keys_per_step, cap=None)
    head = (f"the queue (--moco-k {K}) holds {min(100.0, 100.0 * K / num_images):.0f}% of the {num_images} images, "
            f"so each image meets its own older keys as negatives and the contrastive accuracy can collapse; ")
    if fit > QUEUE_SHARE * num_images:
        # one step's keys alone are too many: only a smaller batch makes room
        return head + (f"the queue holds at least one step's {keys_per_step} keys, so lower --batch-size until "
                       f"--moco-k {max(1, int(QUEUE_SHARE * num_images))} or less is a multiple of it")
    return head + (f"use --moco-k {fit} or less (at most {100 * QUEUE_SHARE:.0f}% of the dataset, a multiple of "
                   f"{keys_per_step})")


def momentum_warning(m: float, steps: int, cosine: bool = False, from_init: bool = False) -> Optional[str]:
    """A sentence when the key encoder would keep more than INIT_SHARE of its initial weights
    after the run's `steps` updates, with a momentum that would not. `from_init`: the run
    has --init, so those weights are the --init file's (both encoders start from it), not
    a random draw."""
    share = init_share_at_end(m, steps, cosine)
    if share <= INIT_SHARE:
        return None
    # the largest of 0.9999, 0.9998, 0.9995, 0.999, ..., 0.9 that leaves at most a tenth of the init
    candidates = [round(1 - f * 10.0 ** -k, 6) for k in (4, 3, 2, 1) for f in (1, 2, 5)]
    suggest = next((c for c in candidates if init_share_at_end(c, steps, cosine) <= 0.1), 0.5)
    start = "its initial (--init) weights" if from_init else "its random initialisation"
    return (f"with --moco-m {m}{' and --moco-m-cos' if cosine else ''} the key encoder still holds "
            f"{100 * share:.0f}% of {start} after the run's {steps} steps, so its keys barely "
            f"improve; use --moco-m {suggest} or lower, or train longer")
