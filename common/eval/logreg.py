"""Multinomial logistic regression on frozen features, fitted to convergence by full-batch
L-BFGS with a fixed L2 penalty on standardised features: nothing to tune (no lr, no epochs),
blind to the scale of the features. The logreg probe (lincls/logreg.py), the payoff of a
pretraining run (common/eval/payoff.py) and bench/quality.py all fit it."""
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from common.errors import UserError

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
                                 test_y: torch.Tensor, num_classes: int, wd: float = PROBE_WD,
                                 max_iter: int = 500) -> float:
    """Test top-1 (%) of fit_logistic_regression trained on (train_x, train_y)."""
    w, b = fit_logistic_regression(train_x, train_y, num_classes, wd, max_iter=max_iter)
    return 100.0 * ((test_x.double() @ w + b).argmax(1) == test_y).double().mean().item()


def stratified_folds(y: torch.Tensor, folds: int, seed: int) -> torch.Tensor:
    """The fold (0 .. folds-1) of every sample: each class's samples, in a seeded order,
    dealt round-robin, so every fold holds about 1/folds of every class."""
    g = torch.Generator().manual_seed(seed)
    fold = torch.empty(len(y), dtype=torch.long)
    for c in torch.unique(y):
        members = (y == c).nonzero().squeeze(1)
        members = members[torch.randperm(len(members), generator=g)]
        fold[members] = torch.arange(len(members)) % folds
    return fold


def group_folds(groups: Sequence[str], folds: int, seed: int) -> torch.Tensor:
    """The fold (0 .. folds-1) of every sample when the samples of one group (a simulation, a
    part, a wafer) must stay in one fold: near-copies split across folds would let the probe
    score itself on images it has all but seen. Groups in a seeded order, largest first, each
    to the fold holding the fewest samples so far."""
    names = sorted(set(groups))
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist()
    size = {name: 0 for name in names}
    for g in groups:
        size[g] += 1
    shuffled = sorted((names[i] for i in order), key=lambda n: -size[n])  # stable: ties keep the seeded order
    filled, of_group = [0] * folds, {}
    for name in shuffled:
        f = min(range(folds), key=lambda i: filled[i])
        of_group[name], filled[f] = f, filled[f] + size[name]
    return torch.tensor([of_group[g] for g in groups], dtype=torch.long)


# L-BFGS iterations of each fold's fit: a quarter of the cost of 500, the folds' scores as good
# (docs/payoff.md, "what it costs")
CV_MAX_ITER = 100


def cross_validated_accuracy(x: torch.Tensor, y: torch.Tensor, num_classes: int, folds: int = 5,
                             seed: int = 0, groups: Optional[Sequence[str]] = None) -> List[float]:
    """Top-1 (%) of each held-out fold of a `folds`-fold stratified cross-validation of
    fit_logistic_regression on (x, y): the probe is scored only on images it was not fitted
    to, and the spread over folds says how much one split of the same labels moves it.
    With `groups` (one name per sample) the folds keep each group together (group_folds)."""
    fold = (group_folds(groups, folds, seed) if groups is not None else stratified_folds(y.cpu(), folds, seed))
    fold = fold.to(y.device)
    return [logistic_regression_accuracy(x[fold != f], y[fold != f], x[fold == f], y[fold == f], num_classes,
                                         max_iter=CV_MAX_ITER) for f in range(folds)]
