"""Before a contrastive run spends its budget: do the recipe's two views of an image still
look more alike than views of different images? For a sample of images, each first view is
matched against every second view, in pixel statistics (a 4x4 thumbnail per channel, plus
mean and spread) and in the untrained backbone's features; the share of images whose own
views are more alike than views of different images is compared with chance (0.5). A recipe that leaves no
instance signal (a 1 % crop and full jitter on flat images, say) is told here, in seconds,
not after the epochs the not-learning check needs (common/watch/collapse.py).
`--view-check-only` (view_check_only) runs the same check without a run, for trying view
settings in seconds."""
import argparse
from typing import Callable, Dict

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from common.augment import transforms as augment
from common.data.datasets import build_dataset
from common.data.transformed import TransformedDataset
from common.distributed.world import is_first_process, uses_cuda
from common.errors import UserError
from common.log.progress import log
from common.data.channels import channels_of
from common.nets.models import build_backbone, without_head

SAMPLE = 64  # images; a few seconds even at 224 px
# below both (chance 0.5): no instance signal; the levels sit between a recipe that destroys the
# instance (a 1 % crop and full jitter on flat grey images) and the recipes that learn on the
# synthetic set (docs/small-data.md: the view check's levels)
NO_SIGNAL_FEATURES, NO_SIGNAL_PIXELS = 0.55, 0.6
# what --view-check-only suggests below both levels (a run names its own values: its learning watch's hint)
HINT = "larger crops (--crop-min), weaker colour jitter (--color-strength), or a larger --crop-size"


def _separation(a: torch.Tensor, b: torch.Tensor) -> float:
    """How often row i of `a` is more similar (cosine) to row i of `b`, its other view, than to
    another row of `b`: over all N x (N-1) pairs, 0.5 by chance, 1.0 when every image's views
    are each other's nearest. Every pair counts, so 64 images resolve it to a few hundredths
    where the share matched first would jump by 1/64."""
    sim = F.normalize(a.float(), dim=1) @ F.normalize(b.float(), dim=1).T
    pos = sim.diagonal().unsqueeze(1)
    wins = (pos > sim).float() + 0.5 * (pos == sim).float()
    n = len(a)
    return ((wins.sum() - 0.5 * n) / (n * (n - 1))).item()  # the diagonal ties itself: 0.5 each


def pixel_descriptor(views: torch.Tensor) -> torch.Tensor:
    """N x (3*16 + 6): each channel's 4x4 thumbnail, mean and standard deviation."""
    thumb = F.adaptive_avg_pool2d(views, 4).flatten(1)
    return torch.cat([thumb, views.mean(dim=(2, 3)), views.std(dim=(2, 3))], dim=1)


@torch.no_grad()
def view_check(dataset: Dataset, recipe: augment.Views, arch: str, small_images: bool, device: torch.device,
               seed: int = 0) -> Dict[str, float]:
    """{"images", "pixels", "features"}: the separation (_separation: 0.5 chance, 1 perfect) of
    the sampled images' two views (`recipe`: one for both, or a pair: view 1 against view 2), by pixel statistics and by the pooled features of an
    untrained `arch` (in train mode: BatchNorm normalises with the sample's statistics). The
    caller's random state is left as it was, so a run draws the same numbers with or without
    the check."""
    with torch.random.fork_rng(devices=[]):
        return _view_check(dataset, recipe, arch, small_images, device, seed)


def _view_check(dataset: Dataset, recipe: augment.Views, arch: str, small_images: bool, device: torch.device,
                seed: int) -> Dict[str, float]:
    n = min(SAMPLE, len(dataset))
    step = max(1, len(dataset) // n)
    views = TransformedDataset(dataset, augment.two_views(recipe), skip_unreadable=True,
                               decode_side=augment.views_decode_side(recipe))
    pairs = [views[(i * step, seed + i)] for i in range(n)]
    pairs = [p[0] for p in pairs if p is not None]
    if len(pairs) < 2:
        raise UserError("the view check needs two readable images; fix or remove the unreadable files")
    first, second = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
    torch.manual_seed(seed)
    net = build_backbone(arch, small_images=small_images,
                         in_channels=augment.view_pair(recipe)[0].channels.count).to(device).train()
    with without_head(net):
        feats = net(torch.cat([first, second]).to(device)).cpu()
    return {"images": len(pairs), "pixels": _separation(pixel_descriptor(first), pixel_descriptor(second)),
            "features": _separation(feats[:len(pairs)], feats[len(pairs):])}


def view_check_message(result: Dict[str, float], hint: str) -> str:
    """The start-of-run line; a warning when neither measure reaches its NO_SIGNAL level."""
    line = (f"=> view check on {result['images']} images: an image's two views are more alike than views of two "
            f"images in {100 * result['pixels']:.0f}% of pairs by pixel statistics and {100 * result['features']:.0f}% "
            f"by the untrained network's features (50% by chance)")
    if result["features"] < NO_SIGNAL_FEATURES and result["pixels"] < NO_SIGNAL_PIXELS:
        line += (f"\nwarning: the augmentations leave almost no instance signal, so the contrastive task cannot "
                 f"be learned; try {hint}")
    return line


def view_check_only(views: Callable[[argparse.Namespace], augment.Views], args: argparse.Namespace) -> bool:
    """--view-check-only (a two-view script's `script_main(..., instead=...)`): the view check of
    the recipe the script would train with (`views(args)`, on the finalized flags, --recipe
    small's choices included) on the pretraining split, one line per --view-check-seeds seed;
    True when it ran, and the command is then done: no worker, no training, nothing written."""
    if not args.view_check_only:
        return False
    if not is_first_process(args):  # under torchrun/srun one process reports
        return True
    dataset = build_dataset(args, "pretrain")
    if dataset is None or len(dataset) < 2:
        raise UserError("the view check needs at least two images in the pretraining split; point DATA at them")
    device = torch.device("cuda" if uses_cuda(args) else "cpu")
    crop_min = "the method's" if args.crop_min is None else f"{args.crop_min:g}"
    log(f"=> --view-check-only: the views of crop {args.crop_size} px, --crop-min {crop_min}, --crop-max "
        f"{args.crop_max:g}, --color-strength {args.color_strength:g}"
        f"{', --gray-images' if args.gray_images else ''}; nothing is trained or written")
    recipe = augment.views_for(views(args), channels_of(args))[0]
    for seed in args.view_check_seeds:
        line = view_check_message(view_check(dataset, recipe, args.arch, args.small_images, device, seed=seed), HINT)
        log(f"seed {seed}: {line.lstrip('=> ')}")
    return True
