"""NT-Xent, the normalized temperature-scaled cross-entropy of SimCLR (Chen et al., 2020).

For a batch of N images seen as two views there are 2N embeddings. Each one is an
anchor whose positive is the other view of its image; the remaining 2N - 2 embeddings
are its negatives:

    loss = mean over the 2N anchors i of  -log( exp(s(i, pos(i)) / T) / sum_{j != i} exp(s(i, j) / T) )

with s the cosine similarity. Under DDP, N is the global batch: every rank gathers
the embeddings of all ranks (common.distributed.collectives.all_gather_with_grad, whose backward returns
to each rank the gradient of its own embeddings from every rank's loss), scores its own
2n anchors against all 2N embeddings, and averages over its anchors. The mean of the
rank losses is then the single-process loss of the whole batch, and DDP's gradient
averaging gives the gradient of that loss.
"""
from typing import Tuple

import torch
import torch.nn.functional as F

from common.distributed.collectives import all_gather_with_grad, get_rank, get_world_size


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """NT-Xent of this rank's anchors against the global batch.

    z1, z2: (n, d) projections of the two views of this rank's n images (row i of both
    comes from the same image); they need not be normalised. Returns (loss, acc1): acc1 is
    the % of anchors whose positive scores above all 2N - 2 negatives.
    """
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"nt_xent expects two (n, d) tensors of one shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    n = z1.shape[0]
    world, rank = get_world_size(), get_rank()
    if n * world < 2:
        raise ValueError("NT-Xent needs at least 2 images in the global batch: with 1 there are no negatives")
    # fp32 from here: the similarities / T of an fp16 or bf16 batch lose the digits the softmax needs
    local = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2n, d): view 1 then view 2
    # every rank's (2n, d) block, rank order; the gradient of our block comes back to us
    everyone = all_gather_with_grad(local)  # (2N, d)
    logits = local @ everyone.T / temperature  # (2n, 2N)
    # our anchor j sits at column rank*2n + j of `everyone`; its positive is the other view
    j = torch.arange(2 * n, device=logits.device)
    self_col = rank * 2 * n + j
    pos_col = rank * 2 * n + (j + n) % (2 * n)
    # an anchor is never its own negative: exp(-inf) = 0 drops it from the denominator
    logits = logits.masked_fill(F.one_hot(self_col, logits.shape[1]).bool(), float("-inf"))
    loss = F.cross_entropy(logits, pos_col)
    with torch.no_grad():
        acc1 = (logits.argmax(dim=1) == pos_col).float().mean() * 100.0
    return loss, acc1
