"""Did pretraining pay off on the user's own images? A pretraining run whose data carries
train labels keeps a share of them out of pretraining (--payoff-holdout) and scores its
backbone with a logistic-regression probe fitted on the other labelled train images and
scored on those it never pretrained on (never val: the run must not choose or judge anything
on the held-out split), compared, part by part, with the network it started from: the
untrained network (its BatchNorm statistics from the same images, as the trained one's are),
or the --init weights and a fresh random network when --init is given. The verdict, with the
spread over the parts, goes to the log, metrics.jsonl and OUTPUT_DIR/payoff.json; a gain
inside the spread is a WARNING naming what to try. With --payoff-holdout 0 the probe is
cross-validated on images pretraining saw (an upper bound: docs/payoff.md).

A run whose views were cut at the source's own scale (source-scale views, --crop-max < 1) saw
its images at that scale, not resized into the crop: the probe then scores the backbone at
both sizes, the crop and the size at which a whole image keeps the views' scale, and the better
one becomes the checkpoint's `eval_size`, the size main_lincls.py and main_knn.py evaluate at
by default."""
import argparse
import copy
import json
import math
import os
import re
import statistics
from typing import Dict, List, Optional

import torch
import torch.nn as nn

from common.augment.transforms import eval_decode_side, eval_transform
from common.files.atomic import write_json_atomic
from common.data.datasets import build_dataset
from common.data.images import FileListDataset
from common.data.subsets import SubsetDataset, stratified_subset
from common.data.transformed import TransformedDataset
from common.distributed.collectives import DistEnv, is_main_process
from common.errors import UserError
from common.eval.embeddings import path_of
from common.eval.features import extract_indexed_features
from common.eval.logreg import CV_MAX_ITER, cross_validated_accuracy, fit_logistic_regression, group_folds
from common.log.progress import log
from common.nets.batchnorm import recalibrate_batchnorm
from common.nets.models import build_backbone, without_head
from common.nets.precision import Precision
from common.data.channels import Channels, channels_of

PAYOFF_FOLDS = 5
# labelled train images the probe uses at most (class-stratified, seeded): its cost stays a
# small part of a run on a large labelled set
PAYOFF_IMAGES = 5000
# ... and when it also scores the learned size (source-scale views), whose pass costs (size /
# crop)^2 times the crop's per image (22x for 300 px sources and a 64 px crop): both sizes on
# the same, smaller sample, so the payoff stays a small part of the run
TWO_SIZES_IMAGES = 1000
PAYOFF_FILE = "payoff.json"
# the most labelled images --payoff-holdout keeps out of pretraining: enough for the verdict's
# parts, a negligible share of a large set
HOLDOUT_MAX = 1000
# with --payoff-groups, the verdict's parts are the held-out groups when there are this many
MIN_HELD_GROUPS = 3
# the fewest labelled images of a class for every fold to hold one
MIN_PER_CLASS = PAYOFF_FOLDS
WHAT_TO_TRY = ("--init imagenet (weights you already have), a larger --crop-size if the images are much larger "
               "than the crop, another method (main_simclr.py, main_moco.py, main_inpaint.py), or more unlabelled "
               "images")


def learned_size(args: argparse.Namespace) -> Optional[int]:
    """The whole-image size (px) at which an image shows the scale the run's views saw: a
    crop_size view of crop_max of the source's area shows it at crop_size / sqrt(crop_max)
    px. None when the views could cover the whole source (--crop-max 1): the crop is that size;
    and for main_inpaint.py, which cuts no views (it has no --crop-max) and sees whole images."""
    if "crop_max" not in vars(args) or args.crop_max >= 1:
        return None
    size = int(round(args.crop_size / math.sqrt(args.crop_max)))
    return size if size > args.crop_size else None


def file_groups(pattern: str, paths: List[str], least: int = PAYOFF_FOLDS) -> List[str]:
    """Each file's group under --payoff-groups (the regex's first group, else its whole match,
    in the file name). Refused in one sentence when a name does not match or there are fewer
    than `least` groups (the folds of the probe without a holdout; two for a holdout: one
    held out, one to fit on)."""
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise UserError(f"--payoff-groups {pattern!r} is not a regular expression ({e}); e.g. '^(s[0-9]+)_'")
    groups, missed = [], []
    for path in paths:
        m = regex.search(os.path.basename(path))
        if m is None:
            missed.append(os.path.basename(path))
        else:
            groups.append(m.group(1) if regex.groups else m.group(0))
    if missed:
        raise UserError(f"--payoff-groups {pattern!r} matches no group in {len(missed)} of the {len(paths)} labelled "
                        f"file names, e.g. {missed[0]!r}; give a regex that every file name matches, its first "
                        f"group naming the image's group")
    if len(set(groups)) < least:
        need = (f"the {PAYOFF_FOLDS}-fold probe needs at least {PAYOFF_FOLDS}" if least == PAYOFF_FOLDS else
                f"--payoff-holdout needs at least {least}: groups to hold out and groups to fit the probe on")
        raise UserError(f"--payoff-groups {pattern!r} finds {len(set(groups))} group(s) in the labelled file names; "
                        f"{need}")
    return groups


def holdout(args: argparse.Namespace, train) -> List[int]:
    """The labelled train images (indices of `train`) kept out of pretraining for the payoff
    probe to be scored on (--payoff-holdout): a class-stratified, seeded share of them, at
    most HOLDOUT_MAX, or with --payoff-groups whole groups in a seeded order until the share
    is reached. Empty when the payoff is off, --payoff-holdout is 0 or the labels are too
    few to measure. The pretraining data (common/train/data.py) and the probe both call it:
    the same seed gives the same images, on every rank and after a resume."""
    if not args.payoff or args.payoff_holdout <= 0 or labels_to_measure(train):
        return []
    if not 0 < args.payoff_holdout < 1:
        raise UserError(f"--payoff-holdout {args.payoff_holdout} is not a share; pass a fraction such as 0.2 (0: "
                        f"keep no labelled images out of pretraining)")
    labelled = [i for i, t in enumerate(train.targets) if t >= 0]
    want = min(int(round(args.payoff_holdout * len(labelled))), HOLDOUT_MAX)
    if args.payoff_groups is not None:
        groups = file_groups(args.payoff_groups, [path_of(train, i) for i in labelled], least=2)
        names = sorted(set(groups))
        order = torch.randperm(len(names), generator=torch.Generator().manual_seed(args.seed)).tolist()
        members: Dict[str, List[int]] = {}
        for i, g in zip(labelled, groups):
            members.setdefault(g, []).append(i)
        held: List[int] = []
        # whole groups until the share is reached, at least MIN_HELD_GROUPS of them (the verdict's
        # spread is then over groups), never more than half the groups (the probe is fitted on the rest)
        for taken, k in enumerate(order[:len(names) // 2]):
            if len(held) >= want and taken >= MIN_HELD_GROUPS:
                break
            held += members[names[k]]
        return sorted(held)
    drawn = stratified_subset([train.targets[i] for i in labelled], want / len(labelled), args.seed)
    return sorted(labelled[i] for i in drawn)


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


def held_parts(y: torch.Tensor, parts: int, seed: int) -> torch.Tensor:
    """The part (0 .. parts-1) of every held-out image: the images sorted by class (seeded
    order within), then dealt round-robin over the whole list, so the parts are as even in
    size as they can be and each holds its share of every class (dealing each class from
    part 0, as stratified_folds does, would leave the last parts empty when classes hold
    fewer images than parts)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.cat([members[torch.randperm(len(members), generator=g)]
                       for members in ((y == c).nonzero().squeeze(1) for c in torch.unique(y))])
    part = torch.empty(len(y), dtype=torch.long)
    part[order] = torch.arange(len(y)) % parts
    return part


def no_gain_warning(gain: float, spread: float, channels: Channels) -> str:
    """The WARNING of a run that did not pay off: a loss beyond the spread said as a loss, and
    what to try (a full-depth run normalised by the set's statistics first: a faint signal under
    an offset that varies per image stays a sliver of the set's std, docs/channels.md)."""
    why = (f"the features got worse than the ones it started from ({gain:+.1f}, beyond the spread {spread:.1f})"
           if gain < -spread else "the gain is inside the spread")
    hint = ("--channel-norm image (when the offset or exposure varies from image to image), "
            if channels.full_depth and not channels.per_image else "") + WHAT_TO_TRY
    return f"=> WARNING: pretraining did not pay off on these images: {why}; try {hint}"


class PayoffProbe:
    """The logreg probe on a run's labelled train images, at the run's crop and at its
    learned_size when it has one (`sizes`). With a --payoff-holdout (`held`, never in the
    pretraining data) it is fitted on up to PAYOFF_IMAGES of the other labelled images and
    scored on the held-out ones, in PAYOFF_FOLDS parts (the held-out groups with
    --payoff-groups): the score of images pretraining never saw, as val's. Without, a
    PAYOFF_FOLDS-fold cross-validation on labelled images pretraining saw. With two sizes, on
    at most TWO_SIZES_IMAGES. `data` (the fitted images at the crop) is None when there are
    too few labels to measure."""

    def __init__(self, args: argparse.Namespace, env: DistEnv):
        self.args, self.env = args, env
        self.data: Optional[TransformedDataset] = None
        train = build_dataset(args, "train")
        self.why_not = labels_to_measure(train)
        if self.why_not:
            return
        classes = list(train.classes)
        self.sizes = [args.crop_size] + [s for s in [learned_size(args)] if s]
        most = PAYOFF_IMAGES if len(self.sizes) == 1 else TWO_SIZES_IMAGES
        if args.payoff_groups is not None and not isinstance(train, FileListDataset):
            raise UserError("--payoff-groups reads the images' file names: give DATA as a folder (or csv) of image "
                            "files, or leave the flag out")
        self.held = holdout(args, train)
        held = set(self.held)
        labelled = [i for i, t in enumerate(train.targets) if t >= 0 and i not in held]
        if len(labelled) > most:
            drawn = stratified_subset([train.targets[i] for i in labelled], most / len(labelled), args.seed)
            labelled = [labelled[i] for i in drawn]
        self.num_classes = len(classes)
        self.groups = file_groups(args.payoff_groups, [path_of(train, i) for i in labelled]) \
            if args.payoff_groups is not None and not self.held else None
        self.held_groups = file_groups(args.payoff_groups, [path_of(train, i) for i in self.held], least=1) \
            if args.payoff_groups is not None and self.held else None

        # an unreadable image gets no row rather than a stand-in under its label
        def images(index: List[int], size: int) -> TransformedDataset:
            return TransformedDataset(SubsetDataset(train, index), eval_transform(size, channels_of(args)),
                                      decode_side=eval_decode_side(size), skip_unreadable=True)

        self.at_size = {size: images(labelled, size) for size in self.sizes}
        self.held_at_size = {size: images(self.held, size) for size in self.sizes} if self.held else {}
        self.data = self.at_size[args.crop_size]

    def describe(self) -> str:
        """What the probe is fitted and scored on, for the log."""
        if not self.held:
            grouped = (f", each of {len(set(self.groups))} --payoff-groups groups in one fold"
                       if self.groups is not None else "")
            return f"{PAYOFF_FOLDS}-fold logreg probe on {len(self.data)} labelled train images{grouped}"
        where = (f" of {len(set(self.held_groups))} --payoff-groups groups" if self.held_groups is not None else "")
        return (f"logreg probe fitted on {len(self.data)} labelled train images and scored on the {len(self.held)} "
                f"held out of pretraining{where} (--payoff-holdout)")

    def score(self, encoder: nn.Module) -> Dict[int, List[float]]:
        """Per-part (per-fold) top-1 (%) of the probe on `encoder`'s features (its head removed), per size."""
        return {size: self._score_at(encoder, size) for size in self.sizes}

    def score_as_initialised(self, encoder: nn.Module) -> Dict[int, List[float]]:
        """score() of copies of `encoder` whose BatchNorm statistics are estimated on the probe's
        images at each size, as a trained network's are (a fresh network's identity statistics
        are another model: common/nets/batchnorm.py)."""
        scores = {}
        for size in self.sizes:
            untrained = copy.deepcopy(encoder)
            with without_head(untrained):
                recalibrate_batchnorm(untrained, self.at_size[size], batch_size=self._batch(size, 256),
                                      device=self.env.device)
            scores[size] = self._score_at(untrained, size)
        return scores

    def _batch(self, size: int, at_crop: int = 0) -> int:
        # the learned size holds (size / crop)^2 times the crop's pixels: a batch of the same memory
        at_crop = at_crop or max(self.args.batch_size // self.env.world_size, 64)
        return max(8, at_crop * self.args.crop_size ** 2 // size ** 2)

    def _features(self, encoder: nn.Module, dataset: TransformedDataset, size: int):
        with without_head(encoder):
            return extract_indexed_features(encoder, dataset, self._batch(size), self.env.device,
                                            precision=Precision.from_args(self.args), normalize=False)

    def _score_at(self, encoder: nn.Module, size: int) -> List[float]:
        x, y, kept = self._features(encoder, self.at_size[size], size)
        if not self.held:
            groups = [self.groups[i] for i in kept.tolist()] if self.groups is not None else None
            return cross_validated_accuracy(x.float(), y, self.num_classes, PAYOFF_FOLDS, seed=self.args.seed,
                                            groups=groups)
        hx, hy, hkept = self._features(encoder, self.held_at_size[size], size)
        w, b = fit_logistic_regression(x.float(), y, self.num_classes, max_iter=PAYOFF_FOLDS * CV_MAX_ITER)
        right = ((hx.double() @ w + b).argmax(1) == hy).double()
        if self.held_groups is not None and len(set(self.held_groups)) >= MIN_HELD_GROUPS:
            names = [self.held_groups[i] for i in hkept.tolist()]
            part = group_folds(names, len(set(names)), self.args.seed)
        else:
            part = held_parts(hy.cpu(), PAYOFF_FOLDS, self.args.seed)
        part = part.to(right.device)
        return [100.0 * right[part == p].mean().item() for p in range(int(part.max()) + 1) if (part == p).any()]


class Payoff:
    """A pretraining run's payoff: `start` scores what the run starts from (or reads it back
    from payoff.json when the run resumes), `measure` scores the backbone now and says the
    verdict. Everything is off when the train split has too few labels, and the log says so.
    `eval_size` is the size the last measure chose (None before, or with one size only)."""

    def __init__(self, args: argparse.Namespace, env: DistEnv):
        self.args, self.env = args, env
        self.probe = PayoffProbe(args, env)
        self.path = os.path.join(args.output_dir, PAYOFF_FILE)
        # size -> baseline name -> summary
        self.baselines: Dict[int, Dict[str, Dict[str, object]]] = {}
        self.eval_size: Optional[int] = None

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
                doc = json.load(f)
            by_size = doc.get("by_size") or {str(self.args.crop_size): {"baselines": doc["baselines"]}}
            self.baselines = {int(size): d["baselines"] for size, d in by_size.items()}
            # a size the run started without has no baseline to compare with
            self.probe.sizes = [size for size in self.probe.sizes if size in self.baselines]
            return
        named: Dict[str, Dict[int, List[float]]] = {}
        if resumed:  # a run that began before payoff.json existed: its initial weights are gone
            named["untrained"] = self.probe.score_as_initialised(self._fresh())
        elif self.args.init:
            named["init"] = self.probe.score_as_initialised(backbone)
            named["untrained"] = self.probe.score_as_initialised(self._fresh())
        else:
            named["untrained"] = self.probe.score_as_initialised(backbone)
        self.baselines = {size: {name: summary(scores[size]) for name, scores in named.items()}
                          for size in self.probe.sizes}
        said = "; ".join((f"at {size} px " if len(self.baselines) > 1 else "")
                         + ", ".join(f"{name} {b['top1']:.1f} +- {b['fold_std']:.1f}" for name, b in at_size.items())
                         for size, at_size in self.baselines.items())
        log(f"=> payoff: {self.probe.describe()}, before training: {said}")
        self._write({})

    def _fresh(self) -> nn.Module:
        """A random network of the run's architecture, drawn from the run's seed."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.args.seed)
            net = build_backbone(self.args.arch, small_images=self.args.small_images, crop_size=self.args.crop_size,
                                 in_channels=self.args.in_channels)
        return net.to(self.env.device)

    def measure(self, backbone: nn.Module, epoch: int) -> Dict[str, object]:
        """The probe on `backbone` against each baseline, at each size (the best size is chosen:
        eval_size): the metrics record's payoff fields, a log line, payoff.json, and a WARNING
        when pretraining did not pay off."""
        if not self.baselines:
            return {}
        with self._forked_rng():
            finals = {size: summary(folds) for size, folds in self.probe.score(backbone).items()}
        by_size = {size: {"baselines": self.baselines[size], "final": final,
                          "verdicts": {name: verdict(final["fold_top1"], b["fold_top1"])
                                       for name, b in self.baselines[size].items()}}
                   for size, final in finals.items()}
        size = max(finals, key=lambda s: finals[s]["top1"])
        baselines, final, verdicts = by_size[size]["baselines"], finals[size], by_size[size]["verdicts"]
        against = "init" if "init" in baselines else "untrained"
        main = verdicts[against]
        record = {"payoff_top1": final["top1"], "payoff_baseline_top1": baselines[against]["top1"],
                  "payoff_gain": main["gain"], "payoff_spread": main["spread"], "paid_off": main["paid_off"]}
        line = (f"=> payoff after epoch {epoch}: the {self.probe.describe()} scores {final['top1']:.1f} against "
                f"{baselines[against]['top1']:.1f} for the {'--init weights' if against == 'init' else 'untrained network'} "
                f"(gain {main['gain']:+.1f}, spread {main['spread']:.1f} over {len(final['fold_top1'])} "
                f"{'parts' if self.probe.held else 'folds'})")
        if "init" in verdicts:
            line += f"; {verdicts['untrained']['gain']:+.1f} over an untrained network"
        if len(finals) > 1:
            self.eval_size = size
            record["payoff_eval_size"] = size
            line += ("\n=> payoff: the views were cut at the source's own scale; the probe scores "
                     + ", ".join(f"{f['top1']:.1f} at {s} px" for s, f in finals.items())
                     + f": main_lincls.py and main_knn.py evaluate this checkpoint at {size} px by default")
        if not main["paid_off"]:
            line += "\n" + no_gain_warning(main["gain"], main["spread"], channels_of(self.args))
        log(line)
        self._write({"epoch": epoch, "final": final, "verdicts": verdicts, "against": against, "eval_size": size,
                     "baselines": baselines, "by_size": {str(s): d for s, d in by_size.items()}})
        return record

    def _write(self, result: Dict[str, object]) -> None:
        if not is_main_process():
            return
        doc = {"probe": self.probe.describe() + " (train labels only, never val)",
               "images": len(self.probe.data), "held_out": len(self.probe.held),
               "held_out_groups": sorted(set(self.probe.held_groups or [])),
               "crop_size": self.args.crop_size, "sizes": self.probe.sizes,
               "baselines": self.baselines[self.args.crop_size] if self.args.crop_size in self.baselines else {},
               "by_size": {str(s): {"baselines": b} for s, b in self.baselines.items()}, **result}
        write_json_atomic(self.path, doc)
