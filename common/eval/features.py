"""Backbone features of a dataset, for kNN, probes and retrieval: every rank embeds its
share, unreadable images are left out and listed, and the rows come back in dataset order."""
import time
from typing import Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from common.data.loader import ResumableSampler
from common.data.transformed import TransformedDataset, drop_unreadable_collate
from common.distributed.collectives import concat_all_gather, get_rank, get_world_size
from common.errors import UserError
from common.log.progress import format_seconds, log
from common.nets.precision import Precision


class _Indexed(Dataset):
    """(index, dataset[index]): the collate then knows which samples it dropped."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        return index, self.dataset[index]


UNREADABLE_LISTED = 20  # paths named in the one-line summary; the per-image warnings name them all


@torch.no_grad()
def extract_indexed_features(model: nn.Module, dataset, batch_size: int, device: torch.device, workers: int = 0,
                             precision: Precision = Precision(), normalize: bool = True, print_freq: int = 0,
                             desc: str = "features") -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(features, labels, index) of the readable samples of `dataset`, in dataset order,
    on `device`: row i is the sample `index[i]`. A TransformedDataset with skip_unreadable
    gives None for an unreadable image: it gets no row, and one warning line counts and
    names the images left out. Under DDP each rank embeds its share and all ranks get the
    whole. Features are L2-normalised fp16; normalize=False returns the raw fp32 outputs
    instead (a classifier's logits). `precision`: --amp, --amp-dtype and --channels-last,
    as in training; print_freq > 0 prints a progress line (`desc`, images/s, ETA) every
    that many batches."""
    world, rank = get_world_size(), get_rank()
    # plain int indices: eval transforms are deterministic
    order = [i for i, _ in ResumableSampler(len(dataset), world, rank, shuffle=False)]
    loader = DataLoader(_Indexed(dataset), batch_size=batch_size, sampler=order, num_workers=workers,
                        pin_memory=device.type == "cuda", collate_fn=drop_unreadable_collate)
    positions = torch.tensor(order, dtype=torch.int64, device=device)
    was_training = model.training
    model.eval()
    feats, labels, kept = [], [], []
    t0, seen, n_batches = time.time(), 0, len(loader)
    for it, (images, target, ok) in enumerate(loader):
        kept.append(ok)
        if images is not None:
            images = precision.images(images, device)
            with precision.autocast(device):
                f = model(images)
            feats.append(F.normalize(f.float(), dim=1).half() if normalize else f.float())
            labels.append(target.to(device).long())
        seen += ok.numel() * world
        if print_freq > 0 and ((it + 1) % print_freq == 0 or it + 1 == n_batches):
            elapsed = time.time() - t0
            log(f"{desc} [{it + 1:>{len(str(n_batches))}}/{n_batches}]  {seen / max(elapsed, 1e-9):.0f} img/s  "
                f"eta {format_seconds(elapsed / (it + 1) * (n_batches - it - 1))}")
    model.train(was_training)
    kept = torch.cat(kept).to(device) if kept else torch.zeros(0, dtype=torch.bool, device=device)
    width = torch.tensor([feats[0].shape[1] if feats else 0], device=device)
    if world > 1:  # a rank whose whole share is unreadable still has to gather rows of the right width
        dist.all_reduce(width, op=dist.ReduceOp.MAX)
    width = int(width.item())
    if width == 0:
        raise UserError(f"no image of the {len(dataset)} in this split can be read; check the data folder")
    if bool(kept.all()):
        local_f, local_l = torch.cat(feats), torch.cat(labels)
    else:  # fixed-size rows per rank, so the gather lines up; the unreadable rows are dropped below
        local_f = torch.zeros(len(order), width, dtype=torch.float16 if normalize else torch.float32, device=device)
        local_l = torch.full((len(order),), -1, dtype=torch.int64, device=device)
        if feats:
            local_f[kept], local_l[kept] = torch.cat(feats), torch.cat(labels)
    kept = kept.to(torch.uint8)  # not every backend gathers bool tensors
    if world > 1:
        local_f, local_l = concat_all_gather(local_f), concat_all_gather(local_l)
        positions, kept = concat_all_gather(positions), concat_all_gather(kept)
    # undo the rank interleave and drop the sampler's padding duplicates
    out_f = torch.empty(len(dataset), width, dtype=local_f.dtype, device=device)
    out_l = torch.empty(len(dataset), dtype=torch.int64, device=device)
    out_kept = torch.empty(len(dataset), dtype=torch.uint8, device=device)
    out_f[positions], out_l[positions], out_kept[positions] = local_f, local_l, kept
    index = out_kept.nonzero().squeeze(1)
    if index.numel() == len(dataset):
        return out_f, out_l, index
    dropped = (out_kept == 0).nonzero().squeeze(1).tolist()
    if isinstance(dataset, TransformedDataset):
        dataset.known_unreadable.update(dropped)
    where = dataset.path if isinstance(dataset, TransformedDataset) else str
    names = ", ".join(repr(where(i)) for i in dropped[:UNREADABLE_LISTED])
    more = f" and {len(dropped) - UNREADABLE_LISTED} more" if len(dropped) > UNREADABLE_LISTED else ""
    log(f"=> warning: {desc}: {len(dropped)} of {len(dataset)} images are unreadable and left out: {names}{more}")
    return out_f[index], out_l[index], index


def extract_features(model: nn.Module, dataset, batch_size: int, device: torch.device, workers: int = 0,
                     precision: Precision = Precision(), normalize: bool = True, print_freq: int = 0,
                     desc: str = "features") -> Tuple[torch.Tensor, torch.Tensor]:
    """(features, labels) of extract_indexed_features: the readable samples, in dataset order."""
    feats, labels, _ = extract_indexed_features(model, dataset, batch_size, device, workers, precision, normalize,
                                                print_freq, desc)
    return feats, labels
