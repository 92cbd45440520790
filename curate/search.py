"""Nearest neighbours of every image among all images: chunked exact search in torch on
the features' device (no N x N matrix), or faiss (--index faiss, an optional extra)."""
from typing import Tuple

import numpy as np
import torch

from common.eval.knn import knn_search
from common.extras import require

INDEXES = ("torch", "faiss")


def self_neighbours(feats: torch.Tensor, k: int, index: str = "torch", chunk_size: int = 1024,
                    bank_chunk_size: int = 65536) -> Tuple[torch.Tensor, torch.Tensor]:
    """(cosine, row) of the k + 1 nearest rows of every row, best first, on the CPU: the
    row itself is among them (an exact copy may come before it), so column k is the k-th
    neighbour other than itself."""
    k = min(k + 1, len(feats))
    if index == "faiss":
        faiss = require("faiss", "faiss-cpu")
        x = np.ascontiguousarray(feats.float().cpu().numpy())
        bank = faiss.IndexFlatIP(x.shape[1])
        bank.add(x)
        sim, idx = bank.search(x, k)
        return torch.from_numpy(sim), torch.from_numpy(idx).long()
    sim, idx = knn_search(feats, feats, k, chunk_size, bank_chunk_size)
    return sim.cpu(), idx.cpu()
