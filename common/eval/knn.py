"""Weighted kNN on L2-normalised features (InstDisc / DINO): the fastest honest
signal of representation quality, used by main_knn.py and the --knn-every monitor."""
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F


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


@torch.no_grad()
def fit_whitening(features: torch.Tensor, dims: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """PCA whitening fitted on unlabelled features (N x D): (mean 1 x D, projection D x d)
    onto the first d = min(dims, N - 1, D) principal axes, each scaled to unit variance.

    Why: cosine kNN weighs every direction by its variance, and on data whose images differ
    mostly by a nuisance (brightness, a texture) the class lives in low-variance directions;
    whitened, every kept axis counts alike (PCA whitening as in image retrieval, Jegou & Chum
    2012; DINO whitens its copy-detection features the same way)."""
    x = features.float()
    mean = x.mean(dim=0, keepdim=True)  # 1xD
    d = max(1, min(dims, x.shape[0] - 1, x.shape[1]))
    # s: min(N, D) singular values, v: min(N, D) x D principal axes of the centred features
    _, s, v = torch.linalg.svd(x - mean, full_matrices=False)
    std = (s[:d] / max(1, x.shape[0] - 1) ** 0.5).clamp_min(1e-6)
    return mean, v[:d].T / std  # projection: Dxd


def whiten(features: torch.Tensor, mean: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """Features (N x D) in the whitened space of fit_whitening: N x d, fp32."""
    return (features.float().to(mean.device) - mean) @ projection
