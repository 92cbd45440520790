"""BYOL's and SimSiam's losses, and the collapse statistics of both (methods without negatives).

BYOL (Grill et al., 2020), eq. 2: the online prediction p and the target projection z' are
l2-normalised and L = ||p - z'||^2 = 2 - 2 cos(p, z'), symmetrised by swapping the views.
SimSiam (Chen and He, 2021), eq. 1-2: D(p, z) = -cos(p, sg(z)), L = D(p1, z2) / 2 + D(p2, z1) / 2.
The two differ by an affine map; SimSiam's lr 0.05 is tuned to its own, hence both are kept.
Neither needs other images of the batch, so nothing is gathered across ranks: DDP's gradient
average of the rank losses is the gradient of the loss of the global batch."""
from typing import Tuple

import torch
import torch.nn.functional as F

from common.eval.metrics import retrieval_acc1


def regression_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's normalised MSE, batch mean: 2 - 2 cos(p, z). p: NxC predictions; z: NxC targets
    (the caller stops their gradient)."""
    return (2 - 2 * F.cosine_similarity(p.float(), z.float(), dim=1)).mean()


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """SimSiam's D(p, z) = -cos(p, z), batch mean. p, z: NxC."""
    return -F.cosine_similarity(p.float(), z.float(), dim=1).mean()


@torch.no_grad()
def std_of_l2_normalized(z: torch.Tensor) -> torch.Tensor:
    """SimSiam's collapse statistic (section 4.1; lightly's std_of_l2_normalized): the std over
    the batch of each dimension of the l2-normalised output, averaged over the dimensions.
    0 is a collapsed output (every image the same vector); an output spread evenly over the
    unit sphere gives 1/sqrt(C). z: NxC."""
    return F.normalize(z.float(), dim=1).std(dim=0).mean()


@torch.no_grad()
def effective_rank(z: torch.Tensor) -> torch.Tensor:
    """The effective rank of the batch's l2-normalised outputs about their mean: the
    participation ratio of the spectrum of the centred outputs' Gram matrix, (sum lambda)^2 /
    sum lambda^2 (the exponential of the Renyi-2 entropy of the normalised eigenvalues; RankMe,
    Garrido et al. 2023, takes the Shannon entropy of the singular values, which needs an SVD:
    on CUDA a host sync every step). About 1 when the outputs vary along one line only (every
    image +v or -v: a collapse that SimSiam's last BatchNorm holds at a healthy std), min(N, C)
    when they vary evenly along that many directions. Centred, because BYOL's outputs share a
    large common component that would otherwise dominate it; a collapse onto one point is the
    std's to see (std_of_l2_normalized), as its small residue may still spread. One N x N (or
    C x C) product, as common/eval/metrics.py retrieval_acc1's. z: NxC."""
    zn = F.normalize(z.float(), dim=1)
    zn = zn - zn.mean(dim=0)
    gram = zn @ zn.T if zn.shape[0] <= zn.shape[1] else zn.T @ zn
    return gram.trace() ** 2 / gram.square().sum().clamp_min(1e-30)


def symmetric_loss(p1: torch.Tensor, p2: torch.Tensor, z1: torch.Tensor, z2: torch.Tensor,
                   simsiam: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """The loss of both directions (p1 against z2, p2 against z1): BYOL's sum of the two, or
    SimSiam's mean of the two negative cosines. z1, z2 must come without gradient. Returns
    (loss, acc1: retrieval_acc1 of both directions)."""
    if simsiam:
        loss = negative_cosine(p1, z2) / 2 + negative_cosine(p2, z1) / 2
    else:
        loss = regression_loss(p1, z2) + regression_loss(p2, z1)
    return loss, (retrieval_acc1(p1, z2) + retrieval_acc1(p2, z1)) / 2
