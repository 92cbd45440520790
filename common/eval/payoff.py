"""Did pretraining pay off on the user's own images? A pretraining run whose data carries
train labels scores its backbone with a cross-validated logistic-regression probe on those
labels (never val: the run must not choose or judge anything on the held-out split) and
compares it, fold by fold, with the network it started from: the untrained network (its
BatchNorm statistics from the same images, as the trained one's are), or the --init weights
and a fresh random network when --init is given. The verdict, with the fold spread, goes to
the log, metrics.jsonl and OUTPUT_DIR/payoff.json; a gain inside the spread is a WARNING
naming what to try."""
import argparse
import copy
import json
import os
import statistics
from typing import Dict, List, Optional

import torch
import torch.nn as nn
from torch.utils.data import Subset

from common.augment.transforms import eval_decode_side, eval_transform
from common.files.atomic import write_json_atomic
from common.data.datasets import build_dataset
from common.data.subsets import stratified_subset
from common.data.transformed import TransformedDataset
from common.dist.collectives import DistEnv, is_main_process
from common.eval.features import extract_features
from common.eval.logreg import cross_validated_accuracy
from common.log.progress import log
from common.nets.batchnorm import recalibrate_batchnorm
from common.nets.models import build_backbone, without_head
from common.nets.precision import Precision

PAYOFF_FOLDS = 5
# labelled train images the probe uses at most (class-stratified, seeded): its cost stays a
# small part of a run on a large labelled set
PAYOFF_IMAGES = 5000
PAYOFF_FILE = "payoff.json"
# the fewest labelled images of a class for every fold to hold one
MIN_PER_CLASS = PAYOFF_FOLDS
WHAT_TO_TRY = ("--init imagenet (weights you already have), a larger --crop-size if the images are much larger "
               "than the crop, another method (main_simclr.py, main_moco.py, main_inpaint.py), or more unlabelled "
               "images")


def summary(folds: List[float]) -> Dict[str, object]:
    return {"top1": statistics.fmean(folds), "fold_top1": folds,
            "fold_std": statistics.stdev(folds) if len(folds) > 1 else 0.0}


def verdict(final: List[float], baseline: List[float]) -> Dict[str, float]:
    """Gain of `final` over `baseline` (per-fold top-1 on the same folds): its mean, and the
    spread (standard deviation over folds) of the paired per-fold gains; it paid off when
    the mean gain is larger than that spread."""
    gains = [f - b for f, b in zip(final, baseline)]
    gain, spread = statistics.fmean(gains), statistics.stdev(gains)
    return {"gain": gain, "spread": spread, "paid_off": gain > spread}


def labels_to_measure(train) -> str:
    """'' when `train` (a dataset) has labels enough for the probe, else why not."""
    classes = list(getattr(train, "classes", None) or [])
    counts = [0] * len(classes)
    for t in train.targets:
        if t >= 0:
            counts[t] += 1
    present = [n for n in counts if n]
    if not present:
        return "the train split has no labels"
    if len(present) < 2 or min(present) < MIN_PER_CLASS:
        return f"the train labels need two classes with at least {MIN_PER_CLASS} images each"
    return ""


class PayoffProbe:
    """The cross-validated logreg probe on (up to PAYOFF_IMAGES of) a run's labelled train
    images at the run's crop. `data` is None when there are too few labels to measure."""

    def __init__(self, args: argparse.Namespace, env: DistEnv):
        self.args, self.env = args, env
        self.data: Optional[TransformedDataset] = None
        train = build_dataset(args, "train")
        self.why_not = labels_to_measure(train)
        if self.why_not:
            return
        classes = list(train.classes)
        labelled = [i for i, t in enumerate(train.targets) if t >= 0]
        if len(labelled) > PAYOFF_IMAGES:
            drawn = stratified_subset([train.targets[i] for i in labelled], PAYOFF_IMAGES / len(labelled), args.seed)
            labelled = [labelled[i] for i in drawn]
        self.num_classes = len(classes)
        # an unreadable image gets no row rather than a stand-in under its label
        self.data = TransformedDataset(Subset(train, labelled), eval_transform(args.crop_size),
                                       decode_side=eval_decode_side(args.crop_size), skip_unreadable=True)

    def score(self, encoder: nn.Module) -> List[float]:
        """Per-fold top-1 (%) of the probe on `encoder`'s features (its head removed)."""
        with without_head(encoder):
            x, y = extract_features(encoder, self.data, max(self.args.batch_size // self.env.world_size, 64),
                                    self.env.device, precision=Precision.from_args(self.args), normalize=False)
        return cross_validated_accuracy(x.float(), y, self.num_classes, PAYOFF_FOLDS, seed=self.args.seed)

    def score_as_initialised(self, encoder: nn.Module) -> List[float]:
        """score() of a copy of `encoder` whose BatchNorm statistics are estimated on the probe's
        images, as a trained network's are (a fresh network's identity statistics are another
        model: common/nets/batchnorm.py)."""
        untrained = copy.deepcopy(encoder)
        with without_head(untrained):
            recalibrate_batchnorm(untrained, self.data, batch_size=256, device=self.env.device)
        return self.score(untrained)


class Payoff:
    """A pretraining run's payoff: `start` scores what the run starts from (or reads it back
    from payoff.json when the run resumes), `measure` scores the backbone now and says the
    verdict. Everything is off when the train split has too few labels, and the log says so."""

    def __init__(self, args: argparse.Namespace, env: DistEnv):
        self.args, self.env = args, env
        self.probe = PayoffProbe(args, env)
        self.path = os.path.join(args.output_dir, PAYOFF_FILE)
        self.baselines: Dict[str, Dict[str, object]] = {}

    def start(self, backbone: nn.Module, resumed: bool) -> None:
        # the probe's loaders draw seeds from torch's generator: forked, so training draws the
        # same numbers with or without --payoff
        with self._forked_rng():
            self._start(backbone, resumed)

    def _forked_rng(self):
        return torch.random.fork_rng(devices=[self.env.device] if self.env.device.type == "cuda" else [])

    def _start(self, backbone: nn.Module, resumed: bool) -> None:
        if self.probe.data is None:
            log(f"=> payoff: not measured, {self.probe.why_not} (label train images, or use main_lincls.py / "
                f"main_knn.py on a labelled split, to see what the pretraining bought)")
            return
        if resumed and os.path.isfile(self.path):
            with open(self.path) as f:
                self.baselines = json.load(f)["baselines"]
            return
        if resumed:  # a run that began before payoff.json existed: its initial weights are gone
            self.baselines["untrained"] = summary(self.probe.score_as_initialised(self._fresh()))
        elif self.args.init:
            self.baselines["init"] = summary(self.probe.score_as_initialised(backbone))
            self.baselines["untrained"] = summary(self.probe.score_as_initialised(self._fresh()))
        else:
            self.baselines["untrained"] = summary(self.probe.score_as_initialised(backbone))
        said = ", ".join(f"{name} {b['top1']:.1f} +- {b['fold_std']:.1f}" for name, b in self.baselines.items())
        log(f"=> payoff: {PAYOFF_FOLDS}-fold logreg probe on {len(self.probe.data)} labelled train images before "
            f"training: {said}")
        self._write({})

    def _fresh(self) -> nn.Module:
        """A random network of the run's architecture, drawn from the run's seed."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.args.seed)
            net = build_backbone(self.args.arch, small_images=self.args.small_images, crop_size=self.args.crop_size)
        return net.to(self.env.device)

    def measure(self, backbone: nn.Module, epoch: int) -> Dict[str, object]:
        """The probe on `backbone` against each baseline: the metrics record's payoff fields,
        a log line, payoff.json, and a WARNING when pretraining did not pay off."""
        if not self.baselines:
            return {}
        with self._forked_rng():
            final = summary(self.probe.score(backbone))
        against = "init" if "init" in self.baselines else "untrained"
        verdicts = {name: verdict(final["fold_top1"], b["fold_top1"]) for name, b in self.baselines.items()}
        main = verdicts[against]
        record = {"payoff_top1": final["top1"], "payoff_baseline_top1": self.baselines[against]["top1"],
                  "payoff_gain": main["gain"], "payoff_spread": main["spread"], "paid_off": main["paid_off"]}
        line = (f"=> payoff after epoch {epoch}: the {PAYOFF_FOLDS}-fold logreg probe on {len(self.probe.data)} "
                f"labelled train images scores {final['top1']:.1f} against {self.baselines[against]['top1']:.1f} for "
                f"the {'--init weights' if against == 'init' else 'untrained network'} (gain {main['gain']:+.1f}, "
                f"fold spread {main['spread']:.1f})")
        if "init" in verdicts:
            line += f"; {verdicts['untrained']['gain']:+.1f} over an untrained network"
        if not main["paid_off"]:
            line += (f"\n=> WARNING: pretraining did not pay off on these images: the gain is inside the fold spread; "
                     f"try {WHAT_TO_TRY}")
        log(line)
        self._write({"epoch": epoch, "final": final, "verdicts": verdicts, "against": against})
        return record

    def _write(self, result: Dict[str, object]) -> None:
        if not is_main_process():
            return
        doc = {"probe": f"{PAYOFF_FOLDS}-fold stratified logistic regression on the train labels (never val)",
               "images": len(self.probe.data), "crop_size": self.args.crop_size, "baselines": self.baselines, **result}
        write_json_atomic(self.path, doc)
