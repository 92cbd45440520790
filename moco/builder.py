"""MoCo (He et al., 2020; v2: Chen et al., 2020): a query encoder trained by
InfoNCE against a momentum-updated key encoder and a queue of past keys.

Names follow the paper and facebookresearch/moco (`encoder_q`, `encoder_k`,
`queue`, `queue_ptr`), so checkpoints are interchangeable with the reference."""
from typing import Callable, Dict, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from common.distributed.collectives import concat_all_gather, get_world_size
from common.nets.ema import momentum_update


class MoCo(nn.Module):
    def __init__(self, base_encoder: Callable[..., nn.Module], dim: int = 128, K: int = 65536,
                 m: float = 0.999, T: float = 0.07, mlp: bool = False, symmetric: bool = False):
        """base_encoder(num_classes=dim) builds a torchvision-style model whose `fc` is the head.
        dim: feature dimension; K: queue size; m: key-encoder momentum; T: softmax temperature."""
        super().__init__()
        self.K, self.m, self.T, self.symmetric = K, m, T, symmetric

        self.encoder_q = base_encoder(num_classes=dim)
        self.encoder_k = base_encoder(num_classes=dim)
        if mlp:  # MoCo v2 head: fc -> ReLU -> fc
            dim_mlp = self.encoder_q.fc.weight.shape[1]
            self.encoder_q.fc = nn.Sequential(nn.Linear(dim_mlp, dim_mlp), nn.ReLU(), self.encoder_q.fc)
            self.encoder_k.fc = nn.Sequential(nn.Linear(dim_mlp, dim_mlp), nn.ReLU(), self.encoder_k.fc)

        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data.copy_(param_q.data)
            param_k.requires_grad = False  # updated only by the momentum rule

        self.register_buffer("queue", F.normalize(torch.randn(dim, K), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    def networks(self) -> Tuple[nn.Module, nn.Module]:
        """The networks (what --compile compiles); the queue and momentum update stay outside."""
        return self.encoder_q, self.encoder_k

    @torch.no_grad()
    def momentum_update_key_encoder(self) -> None:
        """theta_k <- m * theta_k + (1 - m) * theta_q"""
        momentum_update(self.encoder_k, self.encoder_q, self.m)

    @torch.no_grad()
    def dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        """Replace the oldest keys by this step's keys from every rank."""
        keys = concat_all_gather(keys)
        batch_size = keys.shape[0]
        assert self.K % batch_size == 0, "K must be a multiple of the keys enqueued per step"
        # the pointer stays on the device: reading it (int(queue_ptr)) would make the host
        # wait for the forward pass before it could queue the backward's kernels
        cols = self.queue_ptr + torch.arange(batch_size, device=self.queue_ptr.device)  # no wrap: K % B == 0
        self.queue.index_copy_(1, cols, keys.T.to(self.queue.dtype))
        self.queue_ptr.add_(batch_size).remainder_(self.K)

    # ---- shuffle-BN: keys are computed on a shuffled batch so BN cannot leak which
    # sample is the positive through batch statistics

    @torch.no_grad()
    def _batch_shuffle(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        world = get_world_size()
        if world == 1:  # SplitBatchNorm groups play the role of GPUs
            idx_shuffle = torch.randperm(x.shape[0], device=x.device)
            return x[idx_shuffle], torch.argsort(idx_shuffle)
        batch_size_this = x.shape[0]
        x_gather = concat_all_gather(x)
        num_gpus = x_gather.shape[0] // batch_size_this
        idx_shuffle = torch.randperm(x_gather.shape[0], device=x.device)
        dist.broadcast(idx_shuffle, src=0)  # every rank uses rank 0's permutation
        idx_unshuffle = torch.argsort(idx_shuffle)
        idx_this = idx_shuffle.view(num_gpus, -1)[dist.get_rank()]
        return x_gather[idx_this], idx_unshuffle

    @torch.no_grad()
    def _batch_unshuffle(self, x: torch.Tensor, idx_unshuffle: torch.Tensor) -> torch.Tensor:
        if get_world_size() == 1:
            return x[idx_unshuffle]
        batch_size_this = x.shape[0]
        x_gather = concat_all_gather(x)
        num_gpus = x_gather.shape[0] // batch_size_this
        idx_this = idx_unshuffle.view(num_gpus, -1)[dist.get_rank()]
        return x_gather[idx_this]

    # ---- the loss

    @torch.no_grad()
    def compute_keys(self, im_k: torch.Tensor) -> torch.Tensor:
        im_k, idx_unshuffle = self._batch_shuffle(im_k)
        k = F.normalize(self.encoder_k(im_k), dim=1)
        return self._batch_unshuffle(k, idx_unshuffle)

    def contrastive_logits(self, q: torch.Tensor, k: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """InfoNCE logits N x (1+K): column 0 is the positive key, the rest the queue;
        the labels are therefore all zero."""
        l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
        l_neg = torch.einsum("nc,ck->nk", q, self.queue.clone().detach().to(q.dtype))
        logits = torch.cat([l_pos, l_neg], dim=1) / self.T
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        return logits, labels

    def _one_direction(self, im_q: torch.Tensor, k: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        q = F.normalize(self.encoder_q(im_q), dim=1)
        logits, labels = self.contrastive_logits(q, k)
        loss = F.cross_entropy(logits.float(), labels)
        acc1 = (logits.argmax(dim=1) == 0).float().mean() * 100.0
        return loss, acc1

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Returns the InfoNCE loss and {"acc1": % of queries whose positive key scores highest}."""
        with torch.no_grad():
            self.momentum_update_key_encoder()
        if self.symmetric:  # both views serve as query and as key (MoCo CIFAR demo)
            k1, k2 = self.compute_keys(im_q), self.compute_keys(im_k)
            loss_12, acc_12 = self._one_direction(im_q, k2)
            loss_21, acc_21 = self._one_direction(im_k, k1)
            loss, acc1 = loss_12 + loss_21, (acc_12 + acc_21) / 2
            self.dequeue_and_enqueue(torch.cat([k1, k2], dim=0))
        else:
            k = self.compute_keys(im_k)
            loss, acc1 = self._one_direction(im_q, k)
            self.dequeue_and_enqueue(k)
        return loss, {"acc1": acc1}
