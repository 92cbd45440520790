"""The --knn-every monitor of the pretraining scripts: the backbone's kNN accuracy on the
labelled train/val split every N epochs, and once before training for comparison."""
import copy
from typing import Dict

import torch.nn as nn
from torch.utils.data import Subset

from common.augment.transforms import eval_decode_side, eval_transform
from common.data.datasets import build_dataset
from common.data.transformed import TransformedDataset
from common.eval.features import extract_features
from common.eval.knn import knn_accuracy
from common.log.progress import log
from common.nets.batchnorm import recalibrate_batchnorm
from common.nets.models import without_head
from common.nets.precision import Precision
from common.data.channels import channels_of

RECALIBRATION_IMAGES = 2048  # enough for BatchNorm's means and variances, a bounded cost on large sets


class KnnMonitor:
    """kNN accuracy of a pretraining run's backbone on the labelled train/val splits,
    every `--knn-every` epochs (`k` = 20 nearest neighbours, temperature 0.07; there is no
    flag for k here: main_knn.py's --knn-k is that script's own)."""

    def __init__(self, args, env, k: int = 20):
        self.env, self.k, self.args = env, k, args
        train, val = build_dataset(args, "train"), build_dataset(args, "val")
        if val is None or not getattr(train, "classes", None):
            log("=> kNN monitor off: it needs a labelled train split and a val split")
            self.train = self.val = None
            return
        tf, side = eval_transform(args.crop_size, channels_of(args)), eval_decode_side(args.crop_size)
        # an unreadable image gets no row: with a stand-in it would vote (or count) twice
        self.train = TransformedDataset(train, tf, decode_side=side, skip_unreadable=True)
        self.val = TransformedDataset(val, tf, decode_side=side, skip_unreadable=True)
        self.num_classes = len(train.classes)

    def evaluate(self, encoder: nn.Module) -> Dict[str, float]:
        if self.train is None:
            return {}
        bs = max(self.args.batch_size // self.env.world_size, 64)
        with without_head(encoder):
            precision = Precision.from_args(self.args)
            tr_f, tr_l = extract_features(encoder, self.train, bs, self.env.device, precision=precision)
            va_f, va_l = extract_features(encoder, self.val, bs, self.env.device, precision=precision)
        return knn_accuracy(tr_f, tr_l, va_f, va_l, self.num_classes, k=self.k)

    def evaluate_untrained(self, encoder: nn.Module) -> Dict[str, float]:
        """kNN of `encoder`'s initial weights with BatchNorm statistics estimated on (up to
        RECALIBRATION_IMAGES of) the train split: what a run's later kNN is compared with
        (a fresh network's identity statistics are another model; common/nets/batchnorm.py)."""
        if self.train is None:
            return {}
        sample = Subset(self.train, range(min(len(self.train), RECALIBRATION_IMAGES)))
        untrained = copy.deepcopy(encoder)
        with without_head(untrained):
            recalibrate_batchnorm(untrained, sample, batch_size=256, device=self.env.device)
            return self.evaluate(untrained)
