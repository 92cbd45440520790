"""Weighted kNN on L2-normalised features (InstDisc / DINO): the fastest honest
signal of representation quality, used by main_knn.py and the --knn-every monitor."""
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from common.dist import concat_all_gather, get_rank, get_world_size
from common.data import ResumableSampler


@torch.no_grad()
def extract_features(model: nn.Module, dataset, batch_size: int, device: torch.device, workers: int = 0,
                     amp: bool = False, channels_last: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised features (fp16) and labels of every sample of `dataset`, in dataset
    order, on `device`. Under DDP each rank embeds its share and all ranks get the whole."""
    world, rank = get_world_size(), get_rank()
    sampler = ResumableSampler(len(dataset), world, rank, shuffle=False)
    # plain int indices: eval transforms are deterministic
    loader = DataLoader(dataset, batch_size=batch_size, sampler=[i for i, _ in sampler],
                        num_workers=workers, pin_memory=device.type == "cuda")
    positions = torch.tensor([i for i, _ in sampler], device=device)
    was_training = model.training
    model.eval()
    feats, labels = [], []
    for images, target in loader:
        images = images.to(device, non_blocking=True)
        if channels_last:
            images = images.to(memory_format=torch.channels_last)
        with torch.autocast(device.type, enabled=amp):
            f = model(images)
        feats.append(F.normalize(f.float(), dim=1).half())
        labels.append(target.to(device))
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
def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, query_features: torch.Tensor,
                num_classes: int, k: int = 20, temperature: float = 0.07,
                chunk_size: int = 1024) -> torch.Tensor:
    """Class scores (queries x classes) by similarity-weighted voting of the k nearest
    training features, exp(sim / T) as weight. Queries go in chunks so no N x N matrix
    is ever built."""
    k = min(k, train_features.shape[0])
    scores = []
    for start in range(0, query_features.shape[0], chunk_size):
        q = query_features[start:start + chunk_size].to(train_features.dtype)
        sim = (q @ train_features.T).float()
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(q.shape[0], num_classes, device=q.device)
        votes.scatter_add_(1, train_labels[top_idx].long(), weights)
        scores.append(votes)
    return torch.cat(scores)


def knn_accuracy(train_features: torch.Tensor, train_labels: torch.Tensor, val_features: torch.Tensor,
                 val_labels: torch.Tensor, num_classes: int, k: int = 20, temperature: float = 0.07,
                 chunk_size: int = 1024) -> Dict[str, float]:
    """Top-1 / top-5 (top-k clipped to the number of classes) kNN accuracy in percent."""
    scores = knn_predict(train_features, train_labels, val_features, num_classes, k, temperature, chunk_size)
    pred = scores.topk(min(5, num_classes), dim=1).indices
    correct = pred == val_labels.view(-1, 1)
    return {"knn_top1": 100.0 * correct[:, 0].float().mean().item(),
            "knn_top5": 100.0 * correct.any(dim=1).float().mean().item()}


class KnnMonitor:
    """kNN accuracy of a pretraining run's backbone on the labelled train/val splits,
    every `--knn-every` epochs (the `--knn-k` nearest neighbours, temperature 0.07)."""

    def __init__(self, args, env, k: int = 20):
        from common.augment import eval_transform
        from common.data import TransformedDataset, build_dataset
        from common.logging import log

        self.env, self.k, self.args = env, k, args
        train, val = build_dataset(args, "train"), build_dataset(args, "val")
        if val is None or not getattr(train, "classes", None):
            log("=> kNN monitor off: it needs a labelled train split and a val split")
            self.train = self.val = None
            return
        tf = eval_transform(args.crop_size)
        self.train, self.val = TransformedDataset(train, tf), TransformedDataset(val, tf)
        self.num_classes = len(train.classes)

    def evaluate(self, encoder: nn.Module) -> Dict[str, float]:
        from common.models import without_head

        if self.train is None:
            return {}
        bs = max(self.args.batch_size // self.env.world_size, 64)
        with without_head(encoder):
            tr_f, tr_l = extract_features(encoder, self.train, bs, self.env.device, amp=self.args.amp,
                                          channels_last=self.args.channels_last)
            va_f, va_l = extract_features(encoder, self.val, bs, self.env.device, amp=self.args.amp,
                                          channels_last=self.args.channels_last)
        return knn_accuracy(tr_f, tr_l, va_f, va_l, self.num_classes, k=self.k)
