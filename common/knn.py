"""Weighted kNN on L2-normalised features (InstDisc / DINO): the fastest honest
signal of representation quality, used by main_knn.py and the --knn-every monitor."""
import time
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from common.augment import eval_decode_side, eval_transform
from common.datasets import build_dataset
from common.dist import concat_all_gather, get_rank, get_world_size
from common.loader import ResumableSampler
from common.logging import format_seconds, log
from common.models import without_head
from common.precision import Precision
from common.transformed import TransformedDataset


@torch.no_grad()
def extract_features(model: nn.Module, dataset, batch_size: int, device: torch.device, workers: int = 0,
                     precision: Precision = Precision(), normalize: bool = True, print_freq: int = 0,
                     desc: str = "features") -> Tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised features (fp16) and labels of every sample of `dataset`, in dataset
    order, on `device`. Under DDP each rank embeds its share and all ranks get the whole.
    normalize=False returns the raw fp32 outputs instead (a classifier's logits).
    `precision`: --amp, --amp-dtype and --channels-last, as in training; print_freq > 0 prints a progress line (`desc`, images/s, ETA) every that many batches."""
    world, rank = get_world_size(), get_rank()
    sampler = ResumableSampler(len(dataset), world, rank, shuffle=False)
    # plain int indices: eval transforms are deterministic
    loader = DataLoader(dataset, batch_size=batch_size, sampler=[i for i, _ in sampler],
                        num_workers=workers, pin_memory=device.type == "cuda")
    positions = torch.tensor([i for i, _ in sampler], device=device)
    was_training = model.training
    model.eval()
    feats, labels = [], []
    t0, seen, n_batches = time.time(), 0, len(loader)
    for it, (images, target) in enumerate(loader):
        images = precision.images(images, device)
        with precision.autocast(device):
            f = model(images)
        feats.append(F.normalize(f.float(), dim=1).half() if normalize else f.float())
        labels.append(target.to(device))
        seen += images.shape[0] * world
        if print_freq > 0 and ((it + 1) % print_freq == 0 or it + 1 == n_batches):
            elapsed = time.time() - t0
            log(f"{desc} [{it + 1:>{len(str(n_batches))}}/{n_batches}]  {seen / max(elapsed, 1e-9):.0f} img/s  "
                f"eta {format_seconds(elapsed / (it + 1) * (n_batches - it - 1))}")
    model.train(was_training)
    feats, labels = torch.cat(feats), torch.cat(labels)
    if world > 1:
        feats, labels, positions = concat_all_gather(feats), concat_all_gather(labels), concat_all_gather(positions)
    # undo the rank interleave and drop the sampler's padding duplicates
    out_f = torch.empty(len(dataset), feats.shape[1], dtype=feats.dtype, device=device)
    out_l = torch.empty(len(dataset), dtype=labels.dtype, device=device)
    out_f[positions] = feats
    out_l[positions] = labels
    return out_f, out_l


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


def knn_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor, val_features: torch.Tensor,
                 val_labels: torch.Tensor, num_classes: int, k: int = 20, temperature: float = 0.07,
                 chunk_size: int = 1024, train_chunk_size: Optional[int] = 65536) -> Dict[str, float]:
    """Top-1 / top-5 (top-k clipped to the number of classes) kNN accuracy in percent."""
    scores = knn_predict(train_features, train_labels, val_features, num_classes, k, temperature, chunk_size,
                         train_chunk_size)
    pred = scores.topk(min(5, num_classes), dim=1).indices
    correct = pred == val_labels.view(-1, 1)
    return {"knn_top1": 100.0 * correct[:, 0].float().mean().item(),
            "knn_top5": 100.0 * correct.any(dim=1).float().mean().item()}


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
        self.train = TransformedDataset(train, tf, decode_side=side)
        self.val = TransformedDataset(val, tf, decode_side=side)
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
