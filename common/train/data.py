"""The pretraining input: every image of the pretraining split through a view transform,
seeded per sample, in a resumable order (`PretrainData`); the two-view loader with the
--gpu-augment and --gpu-decode paths, and the N-view one (DINO's multi-crop)."""
import argparse
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from torch.utils.data import DataLoader, Dataset

from common.augment import transforms as augment
from common.augment.gpu import ViewsToDevice
from common.augment.gpu_decode import DecodeToDevice, EncodedViews, check_device_decoding, collate_encoded, read_sample
from common.cli import given
from common.data.channels import channels_of
from common.data.datasets import build_dataset
from common.data.loader import ResumableSampler, make_loader
from common.data.shard_order import ShardOrderSampler
from common.data.subsets import SubsetDataset
from common.data.transformed import TransformedDataset, load_sample
from common.distributed.collectives import DistEnv
from common.errors import UserError
from common.eval.embeddings import path_of
from common.eval.payoff import file_groups, holdout
from common.log.progress import log


@dataclass
class PretrainData:
    dataset: TransformedDataset
    loader: DataLoader
    sampler: ResumableSampler
    batch_size: int  # per process
    iters_per_epoch: int
    to_device: Callable  # the loader's views -> normalised device tensors (ViewsToDevice, DecodeToDevice)

    def set_epoch(self, epoch: int, start_iter: int = 0) -> None:
        """This epoch's order; a mid-epoch resume skips the `start_iter` batches done."""
        if self.sampler is not None:  # benchmarks hand a list of batches
            self.sampler.set_epoch(epoch, start_iter * self.batch_size)


def fit_default_batch(args: argparse.Namespace, images: int, world: int) -> None:
    """A default -b larger than the dataset (MoCo v3's 4096, or 256, on a folder of a few
    hundred images) would leave no full batch, so no step: it becomes the largest power of two
    the images fill (a multiple of the `world` processes), said in the log. A -b the command
    line gave is kept; the loader then says in one sentence that it is larger than the data."""
    if given(args, "batch_size") or args.batch_size <= images or images < world:
        return
    fitted = 2 ** int(math.log2(images))
    fitted = max(fitted - fitted % world, world)
    log(f"=> -b {args.batch_size} (not given) is more than the {images} images: -b {fitted} instead, so that every "
        f"epoch has a full batch (pass -b to choose)")
    args.batch_size = fitted


def pretraining_images(args: argparse.Namespace, say: bool = True) -> Dataset:
    """The images a pretraining run trains on: the pretraining split without the labelled
    images --payoff-holdout keeps for the payoff probe (common/eval/payoff.py `holdout`),
    which the probe then scores as images pretraining never saw."""
    images = build_dataset(args, "pretrain")
    train = build_dataset(args, "train")
    held = holdout(args, train)
    if not held:
        return images
    # the pretraining split starts with the train split's images, in its order (STL-10's train+unlabeled too)
    if len(images) < len(train) or any(path_of(images, i) != path_of(train, i) for i in held):
        raise UserError(f"the pretraining images of {args.data!r} are not listed like its labelled train images, "
                        f"so --payoff-holdout cannot keep its images out; pass --payoff-holdout 0")
    kept = sorted(set(range(len(images))) - set(held))
    if say:
        log(f"=> payoff: {len(held)} of the {len(images)} images (labelled train images"
            + (f" of {len(set(file_groups(args.payoff_groups, [path_of(train, i) for i in held], least=1)))} "
               f"--payoff-groups groups" if args.payoff_groups is not None else "")
            + ") kept out of pretraining, for the payoff probe to be scored on images the run never saw "
              "(--payoff-holdout 0 trains on them too)")
    return SubsetDataset(images, kept)


def run_channels(args: argparse.Namespace, views: augment.Views) -> augment.Views:
    """`views` for the run's --in-channels (Recipe.for_channels), saying what was left out."""
    converted, dropped = augment.views_for(augment.with_noise(views, args.noise), channels_of(args))
    if dropped:
        log(f"=> {args.in_channels} channel(s): the views leave out {', '.join(dropped)}, which need RGB colour; "
            f"crops, flips, brightness, contrast, blur (and --noise) apply to every channel")
    return converted


def pretrain_data(args: argparse.Namespace, env: DistEnv, transform, batch_size: int, workers: int,
                  decode_side: int, to_device: Callable, read: Callable = load_sample,
                  collate_fn: Optional[Callable] = None) -> PretrainData:
    """Every image of the pretraining split through `transform` (seeded per sample; labels
    unused), in batches of `batch_size` per process. `read` and `collate_fn`: how a sample
    is read and batched (--gpu-decode reads bytes and keeps them in a list)."""
    dataset = TransformedDataset(pretraining_images(args), transform, args.strict_data, decode_side=decode_side,
                                 read=read)
    loader, sampler = make_loader(dataset, batch_size, env, workers, env.seed, collate_fn=collate_fn)
    iters_per_epoch = len(dataset) // env.world_size // batch_size
    if iters_per_epoch == 0:
        raise UserError(f"the dataset has {len(dataset)} images, fewer than one batch of {args.batch_size}; "
                        f"lower --batch-size or add images")
    log(f"=> {len(dataset)} images, {iters_per_epoch} iterations/epoch, {env.world_size} process(es), "
        f"batch {batch_size}/process on {env.device}")
    if isinstance(sampler, ShardOrderSampler):
        left = sampler.left_out(batch_size)
        log(f"=> shards: each process reads a run of the {len(sampler.spans)} shards front to back (their order "
            f"reshuffled every epoch), samples mixed in a buffer of {sampler.buffer} (--shuffle-buffer); "
            + (f"{left} of the {sampler.total} samples an epoch fill no whole batch on every process and are left "
               f"out, other ones each epoch" if left else "every sample is trained on once an epoch"))
    return PretrainData(dataset, loader, sampler, batch_size, iters_per_epoch, to_device)


def two_view_data(args: argparse.Namespace, env: DistEnv, views: augment.Views, batch_size: int,
                  workers: int) -> PretrainData:
    """Every image of the pretraining split as two independent views (labels unused); `views`:
    one recipe for both, or a (first, second) pair (BYOL's asymmetric views). With
    --gpu-augment the workers hand over uint8 crops and the photometric half of each recipe
    runs batched on the device (data.to_device); with --gpu-decode the workers hand over
    the JPEG bytes and the device decodes and crops too (common/augment/gpu_decode.py)."""
    views = run_channels(args, views)
    first, second = augment.view_pair(views)
    for i, recipe in enumerate((first,) if first == second else (first, second)):
        log(f"=> {'both views' if first == second else f'view {i + 1}'}: {recipe.describe()}")
    decode_side = augment.views_decode_side(views)
    if args.gpu_decode:
        if channels_of(args).full_depth:
            raise UserError(f"--gpu-decode decodes 8-bit RGB JPEGs, not the {args.in_channels}-channel images of "
                            f"--in-channels {args.in_channels}; drop --gpu-decode (--gpu-augment still runs the "
                            f"brightness, contrast and blur on the device)")
        check_device_decoding(env.device)
        data = pretrain_data(args, env, EncodedViews(views, 2), batch_size, workers, decode_side,
                             DecodeToDevice(views, env.device, args.channels_last, args.strict_data),
                             read=read_sample, collate_fn=collate_encoded)
        log(f"=> JPEG decoding, crops and colour/blur augmentation on {env.device.type} (--gpu-decode)")
        return data
    return multi_view_data(args, env, (first, second), batch_size, workers)


def multi_view_data(args: argparse.Namespace, env: DistEnv, recipes: Sequence[augment.Recipe], batch_size: int,
                    workers: int) -> PretrainData:
    """Every image of the pretraining split as len(recipes) views, view i through recipes[i]
    (DINO's multi-crop: 2 global + n local crops; two_view_data's pair), labels unused; the
    views may differ in size. With --gpu-augment the workers hand over uint8 crops and each
    view's photometric ops run batched on the device with its own recipe's spec."""
    if args.gpu_decode and len(recipes) != 2:
        raise UserError(f"--gpu-decode decodes two views per image, not {len(recipes)}; drop --gpu-decode "
                        f"(--gpu-augment keeps the colour and blur ops on the device)")
    recipes = [run_channels(args, r) for r in recipes]
    transform = augment.MultiViewTransform([r.split() for r in recipes] if args.gpu_augment else recipes)
    specs = [r.spec() for r in recipes] if args.gpu_augment else None
    data = pretrain_data(args, env, transform, batch_size, workers, max(r.decode_side() for r in recipes),
                         ViewsToDevice(env.device, args.channels_last, specs))
    log(f"=> colour/blur augmentation on "
        f"{env.device.type + ' (--gpu-augment)' if args.gpu_augment else 'the loader workers'}")
    return data
