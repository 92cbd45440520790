"""The logistic-regression probe (`main_lincls.py --probe logreg`): common/eval/logreg.py's
fit on the frozen backbone's features, written into a classifier's head. Nothing to tune
(the reference SGD probe at lr 30 diverges on small label sets and on features whose scale
differs from a MoCo ResNet-50's)."""
import argparse

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from common.distributed.collectives import DistEnv
from common.distributed.world import per_worker
from common.eval.features import extract_features
from common.eval.logreg import fit_logistic_regression
from common.eval.inputs import eval_view
from common.nets.models import without_head
from common.nets.precision import Precision
from lincls.balance import class_weights


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
