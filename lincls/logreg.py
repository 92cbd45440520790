"""The logistic-regression probe (`main_lincls.py --probe logreg`, bench/quality.py):
multinomial logistic regression on standardised frozen features, fitted to convergence
by full-batch L-BFGS with a fixed L2 penalty, and written into a classifier's head.
Nothing to tune: no lr, no epochs, blind to the scale of the features (the reference SGD
probe at lr 30 diverges on small label sets and on features whose scale differs from a
MoCo ResNet-50's)."""
import argparse
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from common.dist.collectives import DistEnv
from common.dist.world import per_worker
from common.errors import UserError
from common.eval.features import extract_features
from common.eval.setup import eval_view
from common.nets.models import without_head
from common.train.precision import Precision
from lincls.balance import class_weights

PROBE_WD = 1e-3  # L2 on the weights of the standardised features


def fit_logistic_regression(x: torch.Tensor, y: torch.Tensor, num_classes: int, wd: float = PROBE_WD,
                            max_iter: int = 500, class_weight: Optional[torch.Tensor] = None
                            ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Weights (D, C) and bias (C,) on the raw features x (N, D) with labels y (N,): fitted
    in float64 on x standardised by its own mean and std, then folded back, so that
    logits = x @ W + b. `class_weight` (C,) weights the loss per class (--class-weights)."""
    if num_classes < 2:  # the loss is 0 from the start: a "probe" that is right by construction
        raise UserError(f"logistic regression needs at least two classes, got {num_classes}; "
                        f"give a dataset with two or more classes")
    x = x.double()
    mean, std = x.mean(0), x.std(0, unbiased=False) + 1e-6
    z = (x - mean) / std
    w = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, device=x.device, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, device=x.device, requires_grad=True)
    weight = class_weight.double().to(x.device) if class_weight is not None else None
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, history_size=20, tolerance_grad=1e-9,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z @ w + b, y.long(), weight=weight) + wd * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        # ((x - mean) / std) @ w + b = x @ (w / std) + (b - (mean / std) @ w)
        w_raw = w / std.unsqueeze(1)
        return w_raw, b - (mean / std) @ w


def logistic_regression_accuracy(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor,
                                 test_y: torch.Tensor, num_classes: int, wd: float = PROBE_WD) -> float:
    """Test top-1 (%) of fit_logistic_regression trained on (train_x, train_y)."""
    w, b = fit_logistic_regression(train_x, train_y, num_classes, wd)
    return 100.0 * ((test_x.double() @ w + b).argmax(1) == test_y).double().mean().item()


def fit_logreg_head(net: nn.Module, train_data: Dataset, args: argparse.Namespace, env: DistEnv, workers: int) -> None:
    """--probe logreg: the frozen backbone's features of the un-augmented training images
    (the eval transform), multinomial logistic regression on them (fit_logistic_regression;
    with --class-weights, weighted per class), written into net.fc. Every rank fits the
    same model on the same gathered features."""
    with without_head(net):
        x, y = extract_features(net, eval_view(train_data, args), per_worker(args.batch_size, env.world_size),
                                env.device, workers=workers, precision=Precision.from_args(args), normalize=False,
                                print_freq=50, desc="probe features")
    num_classes = net.fc.out_features
    weight = class_weights(train_data.targets, num_classes) if args.class_weights else None
    w, b = fit_logistic_regression(x.float(), y, num_classes, class_weight=weight)
    with torch.no_grad():
        net.fc.weight.copy_(w.T.to(net.fc.weight.dtype))
        net.fc.bias.copy_(b.to(net.fc.bias.dtype))
