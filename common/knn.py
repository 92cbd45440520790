"""Weighted kNN on L2-normalised features (InstDisc / DINO): the fastest honest
signal of representation quality, used by main_knn.py and the --knn-every monitor."""
import copy
import time
from typing import Dict, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset

from common.augment import eval_decode_side, eval_transform
from common.batchnorm import recalibrate_batchnorm
from common.datasets import build_dataset
from common.dist import concat_all_gather, get_rank, get_world_size
from common.errors import UserError
from common.loader import ResumableSampler
from common.logging import format_seconds, log
from common.models import without_head
from common.precision import Precision
from common.transformed import TransformedDataset, drop_unreadable_collate


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


@torch.no_grad()
def knn_search(train_features: torch.Tensor, query_features: torch.Tensor, k: int, chunk_size: int = 1024,
               train_chunk_size: Optional[int] = 65536) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities (fp32) and indices of the k nearest training features of every
    query, best first. Queries go `chunk_size` at a time against `train_chunk_size`
    training rows at a time (None: all), keeping a running top-k, so memory is
    chunk x train_chunk whatever the sizes: no N x N matrix is ever built.

    Each chunk is upcast to fp32 and re-normalised before the product: fp16 similarities
    only resolve ~5e-4 near 1, which would tie an image with its near-duplicates."""
    k = min(k, train_features.shape[0])
    n_train = train_features.shape[0]
    step = n_train if not train_chunk_size else train_chunk_size
    all_sim, all_idx = [], []
    for start in range(0, query_features.shape[0], chunk_size):
        q = F.normalize(query_features[start:start + chunk_size].to(train_features.device).float(), dim=1)
        best_sim = best_idx = None
        for t0 in range(0, n_train, step):
            # copy=True: an fp32 bank must not be normalised in place; one fp32 copy per chunk
            t = train_features[t0:t0 + step].to(torch.float32, copy=True)
            t /= t.norm(dim=1, keepdim=True).clamp_min(1e-12)
            sim, idx = (q @ t.T).topk(min(k, t.shape[0]), dim=1)
            idx += t0
            if best_sim is not None:
                # merge with the best so far (only exact ties can order differently from one
                # unchunked topk)
                merged = torch.cat([best_sim, sim], dim=1)
                sim, pos = merged.topk(min(k, merged.shape[1]), dim=1)
                idx = torch.cat([best_idx, idx], dim=1).gather(1, pos)
            best_sim, best_idx = sim, idx
        all_sim.append(best_sim)
        all_idx.append(best_idx)
    return torch.cat(all_sim), torch.cat(all_idx)


def knn_vote(top_sim: torch.Tensor, top_idx: torch.Tensor, train_labels: torch.Tensor, num_classes: int,
             k: int = 20, temperature: float = 0.07) -> torch.Tensor:
    """Class scores from the first k columns of a knn_search result: every neighbour votes
    for its class with weight exp(sim / T). One search with the largest k serves every k."""
    k = min(k, top_sim.shape[1])
    weights = (top_sim[:, :k] / temperature).exp()
    votes = torch.zeros(top_sim.shape[0], num_classes, device=top_sim.device)
    votes.scatter_add_(1, train_labels.to(top_idx.device)[top_idx[:, :k]].long(), weights)
    return votes


@torch.no_grad()
def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, query_features: torch.Tensor,
                num_classes: int, k: int = 20, temperature: float = 0.07,
                chunk_size: int = 1024, train_chunk_size: Optional[int] = 65536) -> torch.Tensor:
    """Class scores (queries x classes) by similarity-weighted voting of the k nearest
    training features, exp(sim / T) as weight. Similarities are computed in chunks
    (knn_search), so no N x N matrix is ever built."""
    top_sim, top_idx = knn_search(train_features, query_features, k, chunk_size, train_chunk_size)
    return knn_vote(top_sim, top_idx, train_labels, num_classes, k, temperature)


def top_n(k: int, num_classes: int) -> int:
    """How many of the best-voted classes "top-5" looks at: DINO's min(5, k) (k neighbours
    vote for at most k classes; the rest of a top-5 would be classes without a single vote,
    which inflated top-5 at small k), clipped to the number of classes."""
    return min(5, k, num_classes)


def vote_accuracy(scores: torch.Tensor, labels: torch.Tensor, n: int) -> Tuple[float, float]:
    """(top-1, top-n) in percent of class scores (queries x classes) against labels."""
    pred = scores.topk(n, dim=1).indices
    correct = pred == labels.to(pred.device).view(-1, 1)
    return 100.0 * correct[:, 0].float().mean().item(), 100.0 * correct.any(dim=1).float().mean().item()


def knn_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor, val_features: torch.Tensor,
                 val_labels: torch.Tensor, num_classes: int, k: int = 20, temperature: float = 0.07,
                 chunk_size: int = 1024, train_chunk_size: Optional[int] = 65536) -> Dict[str, float]:
    """kNN top-1 and top-5 accuracy in percent, as {"knn_top1", "knn_top5"}. Top-5 looks at
    the top_n(k, C) best-voted classes; with k < 5 neighbours the key says so: knn_top<k>."""
    scores = knn_predict(train_features, train_labels, val_features, num_classes, k, temperature, chunk_size,
                         train_chunk_size)
    k_used = min(k, train_features.shape[0])
    top1, top5 = vote_accuracy(scores, val_labels, top_n(k_used, num_classes))
    return {"knn_top1": top1, f"knn_top{min(5, k_used)}": top5}


RECALIBRATION_IMAGES = 2048  # enough for BatchNorm's means and variances, a bounded cost on large sets


class KnnMonitor:
    """kNN accuracy of a pretraining run's backbone on the labelled train/val splits,
    every `--knn-every` epochs (the `--knn-k` nearest neighbours, temperature 0.07)."""

    def __init__(self, args, env, k: int = 20):
        self.env, self.k, self.args = env, k, args
        train, val = build_dataset(args, "train"), build_dataset(args, "val")
        if val is None or not getattr(train, "classes", None):
            log("=> kNN monitor off: it needs a labelled train split and a val split")
            self.train = self.val = None
            return
        tf, side = eval_transform(args.crop_size), eval_decode_side(args.crop_size)
        # an unreadable image gets no row: with a stand-in it would vote (or count) twice
        self.train = TransformedDataset(train, tf, decode_side=side, skip_unreadable=True)
        self.val = TransformedDataset(val, tf, decode_side=side, skip_unreadable=True)
        self.num_classes = len(train.classes)

    def evaluate(self, encoder: nn.Module) -> Dict[str, float]:
        if self.train is None:
            return {}
        bs = max(self.args.batch_size // self.env.world_size, 64)
        with without_head(encoder):
            precision = Precision.from_args(self.args)
            tr_f, tr_l = extract_features(encoder, self.train, bs, self.env.device, precision=precision)
            va_f, va_l = extract_features(encoder, self.val, bs, self.env.device, precision=precision)
        return knn_accuracy(tr_f, tr_l, va_f, va_l, self.num_classes, k=self.k)

    def evaluate_untrained(self, encoder: nn.Module) -> Dict[str, float]:
        """kNN of `encoder`'s initial weights with BatchNorm statistics estimated on (up to
        RECALIBRATION_IMAGES of) the train split: what a run's later kNN is compared with
        (a fresh network's identity statistics are another model; common/batchnorm.py)."""
        if self.train is None:
            return {}
        sample = Subset(self.train, range(min(len(self.train), RECALIBRATION_IMAGES)))
        untrained = copy.deepcopy(encoder)
        with without_head(untrained):
            recalibrate_batchnorm(untrained, sample, batch_size=256, device=self.env.device)
            return self.evaluate(untrained)
