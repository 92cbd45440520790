"""MoCo (He et al., 2020; v2: Chen et al., 2020): a query encoder trained by
InfoNCE against a momentum-updated key encoder and a queue of past keys.

Names follow the paper and facebookresearch/moco (`encoder_q`, `encoder_k`,
`queue`, `queue_ptr`), so checkpoints are interchangeable with the reference."""
from typing import Callable, Dict, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from common.dist.collectives import concat_all_gather, get_world_size


class _GroupBatchNorm(torch.autograd.Function):
    """Training-mode BatchNorm with statistics per group of samples (sample i in group
    i mod S), computed on a (N/S, S, C, H, W) view of the input. Splitting the batch
    dimension is a view in any memory format, so a channels-last tensor is never copied
    (the (N/S, C*S, H, W) reshape of the reference's SplitBatchNorm copies it in every
    layer, and its NCHW output turns every following convolution back to NCHW).
    Statistics are accumulated in fp32 whatever the input dtype (bf16 under --amp)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, num_splits, momentum, eps):
        N, C, H, W = x.shape
        x5 = x.view(N // num_splits, num_splits, C, H, W)
        dims, m, acc = (0, 3, 4), N // num_splits * H * W, _accumulate_dtype(x)
        # two reading passes, nothing written: on CUDA both reductions load bf16 and add in fp32
        mean = x5.sum(dims, dtype=acc) / m  # S x C
        var = (torch.linalg.vector_norm(x5, 2, dims, dtype=acc).square_() / m - mean * mean).clamp_(min=0)
        rstd = torch.rsqrt(var + eps)
        scale = weight.to(acc) * rstd  # y = x * scale + shift
        shift = bias.to(acc) - mean * scale
        y = torch.empty_like(x)  # same memory format as x; written through its 5-d view (a Function may
        # not return a view: ReLU(inplace) follows)
        torch.addcmul(shift.to(x.dtype).view(1, num_splits, C, 1, 1), x5, scale.to(x.dtype).view(1, num_splits, C, 1, 1),
                      out=y.view(N // num_splits, num_splits, C, H, W))
        with torch.no_grad():  # as BatchNorm2d on every group, then averaged over the groups
            running_mean.mul_(1 - momentum).add_(mean.mean(0), alpha=momentum)
            running_var.mul_(1 - momentum).add_((var * (m / max(m - 1, 1))).mean(0), alpha=momentum)
        ctx.save_for_backward(x, mean, rstd, scale)
        ctx.num_splits, ctx.m = num_splits, m
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, mean, rstd, scale = ctx.saved_tensors
        S, m = ctx.num_splits, ctx.m
        N, C, H, W = x.shape
        x5, g5, dims = x.view(N // S, S, C, H, W), grad_y.view(N // S, S, C, H, W), (0, 3, 4)
        acc = _accumulate_dtype(x)
        sum_g = g5.sum(dims, dtype=acc)  # S x C
        sum_g_xhat = rstd * ((g5 * x5).sum(dims, dtype=acc) - mean * sum_g)
        # dx = scale * (g - mean(g) - xhat * mean(g * xhat)) = scale * g + x * k1 + k0
        k1 = -scale * rstd * sum_g_xhat / m
        k0 = -scale * sum_g / m - k1 * mean
        shape = (1, S, C, 1, 1)
        dx = torch.addcmul(torch.addcmul(k0.to(x.dtype).view(shape), x5, k1.to(x.dtype).view(shape)),
                           g5, scale.to(x.dtype).view(shape))
        return dx.view(N, C, H, W), sum_g_xhat.sum(0), sum_g.sum(0), None, None, None, None, None


def _group_batch_norm_ops(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, running_mean: torch.Tensor,
                          running_var: torch.Tensor, num_splits: int, momentum: float, eps: float) -> torch.Tensor:
    """_GroupBatchNorm's statistics in plain differentiable ops, for torch.compile: the
    Function writes through an `out=` view, which dynamo cannot trace (a graph break in
    every BN layer left each block a graph of its own, past the recompile limit), while
    these ops let inductor fuse the statistics, normalisation and ReLU in any layout."""
    N, C, H, W = x.shape
    x5 = x.view(N // num_splits, num_splits, C, H, W).to(_accumulate_dtype(x))
    var, mean = torch.var_mean(x5, dim=(0, 3, 4), correction=0, keepdim=True)  # 1 x S x C x 1 x 1
    y = (x5 - mean) * torch.rsqrt(var + eps) * weight.view(1, 1, C, 1, 1) + bias.view(1, 1, C, 1, 1)
    with torch.no_grad():
        m = N // num_splits * H * W
        running_mean.mul_(1 - momentum).add_(mean.view(num_splits, C).mean(0), alpha=momentum)
        running_var.mul_(1 - momentum).add_((var * (m / max(m - 1, 1))).view(num_splits, C).mean(0),
                                                      alpha=momentum)
    return y.to(x.dtype).reshape(N, C, H, W)


def _accumulate_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


class SplitBatchNorm(nn.BatchNorm2d):
    """BatchNorm computed over `num_splits` groups of the batch (sample i in group
    i mod num_splits): on one device it stands in for the per-GPU BN of multi-GPU
    MoCo, so that shuffling keys across groups hides intra-batch statistics.
    Same parameters and buffers as BatchNorm2d, so checkpoints load in a plain ResNet.

    A contiguous (NCHW) input takes the reference's path, a free reshape to
    (N/S, C*S, H, W) and one cuDNN BatchNorm; any other layout (--channels-last) takes
    _GroupBatchNorm, the same statistics without copying the input."""

    def __init__(self, num_features: int, num_splits: int, **kw):
        super().__init__(num_features, **kw)
        self.num_splits = num_splits

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        N, C, H, W = input.shape
        if not ((self.training or not self.track_running_stats) and self.num_splits > 1):
            return super().forward(input)
        if torch.compiler.is_compiling() and self.affine and self.track_running_stats:
            return _group_batch_norm_ops(input, self.weight, self.bias, self.running_mean, self.running_var,
                                         self.num_splits, self.momentum, self.eps)
        if not input.is_contiguous() and self.affine and self.track_running_stats:
            return _GroupBatchNorm.apply(input, self.weight, self.bias, self.running_mean, self.running_var,
                                         self.num_splits, self.momentum, self.eps)
        running_mean_split = self.running_mean.repeat(self.num_splits)
        running_var_split = self.running_var.repeat(self.num_splits)
        outcome = F.batch_norm(
            input.reshape(-1, C * self.num_splits, H, W), running_mean_split, running_var_split,
            self.weight.repeat(self.num_splits), self.bias.repeat(self.num_splits),
            True, self.momentum, self.eps).view(N, C, H, W)
        self.running_mean.data.copy_(running_mean_split.view(self.num_splits, C).mean(dim=0))
        self.running_var.data.copy_(running_var_split.view(self.num_splits, C).mean(dim=0))
        return outcome


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
        params_q = [p.data for p in self.encoder_q.parameters()]
        params_k = [p.data for p in self.encoder_k.parameters()]
        # multi-tensor kernels: a few launches instead of two per parameter, same arithmetic
        torch._foreach_mul_(params_k, self.m)
        torch._foreach_add_(params_k, params_q, alpha=1.0 - self.m)

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
