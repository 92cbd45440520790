"""SplitBatchNorm: BatchNorm whose statistics are computed over groups of the batch, to
simulate in one process the per-GPU BatchNorm groups of multi-GPU MoCo, so that its
shuffle-BN (keys computed on a shuffled batch) still hides which sample is the positive
from the batch statistics. The MoCo authors' single-GPU CIFAR demo
(facebookresearch/moco, colab/moco_cifar10_demo.ipynb) does the same with its
SplitBatchNorm; main_moco.py uses it for --bn-splits > 1 when it runs in one process.

Besides the reference's reshape path this module has a channels-last path
(_GroupBatchNorm, a custom autograd Function) and plain differentiable ops for
torch.compile (_group_batch_norm_ops)."""
import torch
import torch.nn as nn
import torch.nn.functional as F


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
        if N % self.num_splits:
            return self._uneven_groups(input)
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

    def _uneven_groups(self, input: torch.Tensor) -> torch.Tensor:
        """A batch that does not divide by num_splits (the last batch of a kNN pass or of the
        BatchNorm recalibration on an odd image count): sample i stays in group i mod S, the
        first N mod S groups holding one sample more. Kept over the alternatives because it is
        the even case's own rule: every sample is normalised by the group it would be in with
        one more sample per group, so the remainder never sees another group's statistics
        (that would hint at which samples sit together, what shuffle-BN hides) and the batch
        is never one group (the positive's statistics shared with its key). The running
        statistics move by the groups' statistics weighted by their sizes, which for equal
        groups is the even path's plain average. S small batch-norm calls: this batch is rare."""
        N = input.shape[0]
        out = torch.empty_like(input)
        track = self.track_running_stats and self.running_mean is not None
        new_mean = torch.zeros_like(self.running_mean) if track else None
        new_var = torch.zeros_like(self.running_var) if track else None
        for s in range(min(self.num_splits, N)):  # N < S: the empty groups are no groups
            rows = input[s::self.num_splits]
            rm = self.running_mean.clone() if track else None
            rv = self.running_var.clone() if track else None
            out[s::self.num_splits] = F.batch_norm(rows, rm, rv, self.weight, self.bias, True, self.momentum,
                                                   self.eps)
            if track:
                share = rows.shape[0] / N
                new_mean.add_(rm, alpha=share)
                new_var.add_(rv, alpha=share)
        if track:
            with torch.no_grad():
                self.running_mean.copy_(new_mean)
                self.running_var.copy_(new_var)
        return out
