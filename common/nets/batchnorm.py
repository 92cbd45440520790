"""BatchNorm: groups too small to normalise, and statistics estimated from data.

BatchNorm needs enough values per channel in each normalisation group: samples x the
spatial positions of the layer's map. A 32 px image through an ImageNet stem reaches
layer4 as a 1x1 map, so `-b 16 --bn-splits 8` normalises 2 values per channel there: the
statistics are pure noise, the running variance explodes and the weights diverge while the
loss still looks normal. One sample on a 1x1 map is a ValueError deep in torch. Both are
caught before training with the values that work.

A trained network's BatchNorm statistics come from the data; an untrained one's are the
identity (mean 0, variance 1). `recalibrate_batchnorm` gives an untrained network the
data's statistics, so "what did training the weights buy" compares like with like."""
from typing import Optional

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, default_collate

from common.errors import UserError
from common.nets.models import build_backbone

MIN_VALUES = 4  # below this BN's statistics make training diverge (2 values: weights 2e6 after 4 steps)
WARN_VALUES = 16


@torch.no_grad()
def fewest_positions(arch: str, small_images: bool, crop_size: int) -> int:
    """The fewest spatial positions (H x W) any BatchNorm2d of the backbone normalises per
    image at `crop_size`; one forward of a single blank image, in eval mode."""
    model = build_backbone(arch, small_images=small_images).eval()
    seen = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[-2] * inp[0].shape[-1]))
             for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    model(torch.zeros(1, 3, crop_size, crop_size))
    for h in hooks:
        h.remove()
    return min(seen) if seen else 0


def bn_group_warning(samples: int, positions: int, where: str, fix: str) -> Optional[str]:
    """Refuse (UserError) a BatchNorm group of fewer than MIN_VALUES values per channel;
    a sentence to print when it holds fewer than WARN_VALUES; else None. `where`: how the
    group arises (e.g. "-b 16 split into --bn-splits 8 groups"); `fix`: what to change."""
    if positions == 0:  # no BatchNorm2d in the network
        return None
    values = samples * positions
    what = (f"BatchNorm normalises {samples} sample(s) x {positions} position(s) = {values} value(s) per channel "
            f"in its smallest map ({where})")
    if values < MIN_VALUES:
        raise UserError(f"{what}: too few for BatchNorm statistics, training would fail or diverge; {fix} "
                        f"(at least {MIN_VALUES} values, {WARN_VALUES} or more to be safe)")
    if values < WARN_VALUES:
        return f"{what}: noisy statistics can make training unstable; {fix} ({WARN_VALUES} or more values)"
    return None


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, dataset: Dataset, batch_size: int = 256,
                          device: torch.device = torch.device("cpu")) -> nn.Module:
    """Replace every BatchNorm's running statistics by their average over `dataset`
    ((image, label) samples, e.g. the eval-transformed train split; None for an unreadable
    image, which is left out); weights untouched. Returns the model in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
    model.train()
    seen = 0
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=_readable):
        if batch is None:
            continue
        seen += 1
        for m in norms:  # momentum 1/t: the running statistics are the mean over the t batches so far
            m.momentum = 1.0 / seen
        model(batch[0].to(device))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    return model.eval()


def _readable(samples: list):
    kept = [s for s in samples if s is not None]
    return default_collate(kept) if kept else None
