"""`--recipe small`'s trial on the user's own labels: when the pretraining data carries train
labels, each candidate recipe (the method's views, weaker jitter, larger crops, and on sources
much larger than the crop the source-scale views at two strengths) is trained for the first
epochs of its own schedule, a few thousand images seen, and scored by the payoff probe
(common/eval/payoff.py: a logreg probe scored on labelled train images the candidates never
pretrained on, never val). The method's own views are kept when they already pay off in the
trial (choose()); otherwise the best-scoring candidate is. The chosen run is then continued,
exactly, for its full budget: its trial epochs are not lost, and the others cost about a
quarter of the run's budget at most. The table is printed and stored in
OUTPUT_DIR/trial.json. Without labels the view check decides (common/train/source_views.py)
and the log says the choice was not measured."""
import argparse
import json
import os
import shutil
import time
from typing import Callable, Dict, List

from common.files.atomic import write_json_atomic
from common.ckpt.io import prepare_output_dir
from common.ckpt.resume import resolve_resume
from common.cli import given
from common.data.datasets import build_dataset
from common.distributed.launch import launch
from common.distributed.world import detect_launcher
from common.errors import UserError
from common.eval.payoff import PAYOFF_FILE, WHAT_TO_TRY, labels_to_measure
from common.log.progress import log
from common.train.data import pretraining_images
from common.train.recipes import profile_data
from common.train.source_views import FLAGS, SOURCE_SCALE_RATIO, shorter_budget, source_scale_area

TRIAL_FILE = "trial.json"
TRIAL_DIR = "trial"
# images each candidate sees at most ("a few thousand"), and the share of the run's budget the
# candidates that lose may cost together
TRIAL_IMAGES = 5000
TRIAL_SHARE = 0.25
NO_GAIN_EXIT = 4  # --stop-if-no-gain (2 is a usage error, 3 --stop-if-not-learning, 75 a requeue)


def trial_planned(args: argparse.Namespace) -> str:
    """'' when the trial will run for this fresh `--recipe small` run, else why not (for the log)."""
    if args.recipe != "small" or not args.trial:
        return "off"
    if any(given(args, f) for f in FLAGS):
        return "the views were given on the command line"
    if detect_launcher() is not None:
        return "runs under torchrun/srun are not trialled: run the trial on one node first, then pass its views"
    return labels_to_measure(build_dataset(args, "train"))


def candidates(args: argparse.Namespace, short_side: int) -> List[Dict[str, object]]:
    """The recipes to try: the method's views, then the fixes the not-learning hint names
    (weaker jitter, larger crops), then on sources SOURCE_SCALE_RATIO crops wide or more the
    source-scale views at two strengths (their own, shorter budget: shorter_budget)."""
    crop_min = args.crop_min if args.crop_min is not None else 0.0
    out: List[Dict[str, object]] = [{}, {"color_strength": round(args.color_strength / 4, 4)},
                                    {"crop_min": round(max(0.4, 2 * crop_min), 4)}]
    if short_side >= SOURCE_SCALE_RATIO * args.crop_size:
        area = round(source_scale_area(args.crop_size, short_side), 6)
        out += [{"crop_min": area, "crop_max": area, "color_strength": s} for s in (0.5, 0.1)]
    return out


def describe(candidate: Dict[str, object]) -> str:
    if not candidate:
        return "the method's views"
    return " ".join(f"--{k.replace('_', '-')} {v:g}" for k, v in candidate.items())


def _candidate_args(args: argparse.Namespace, cand: Dict[str, object], folder: str,
                    images: int) -> argparse.Namespace:
    sub = argparse.Namespace(**{**vars(args), **cand})
    sub.given_flags = set(args.given_flags) | set(cand)  # its values count as typed: nothing re-chooses them
    if "crop_max" in cand:  # source-scale views: their own, shorter budget
        shorter_budget(sub, images)
    sub.output_dir, sub.resume, sub.overwrite = folder, None, True
    sub.export_at_end, sub.payoff, sub.trial = False, True, False
    return sub


def recipe_trial(worker: Callable, args: argparse.Namespace) -> argparse.Namespace:
    """Run the trial (see the module docstring) before the run's workers start, and return the
    args of the run to continue: the chosen candidate's, resuming from its trial checkpoint."""
    if resolve_resume(args.resume, args.output_dir):
        return args
    why_not = trial_planned(args)
    if why_not:
        if why_not != "off":
            log(f"=> --recipe {args.recipe}: no trial ({why_not}); the views were not measured on labels")
        return args
    dataset = build_dataset(args, "pretrain")
    images, short_side = len(dataset), profile_data(dataset).short_side
    cands = candidates(args, short_side)
    budgets = [_candidate_args(args, c, "", images).epochs * images for c in cands]
    per_candidate = min(TRIAL_IMAGES, TRIAL_SHARE * min(budgets) / (len(cands) - 1))
    stop = max(1, round(per_candidate / images))
    if stop * images * (len(cands) - 1) > 1.5 * TRIAL_SHARE * min(budgets) or stop >= min(budgets) // images:
        log(f"=> --recipe {args.recipe}: no trial (one epoch of {images} images is too large a part of the "
            f"{min(budgets):,}-image budget for {len(cands)} candidates); the views were not measured on labels")
        return args
    if 0 < args.stop_at_epoch <= stop:
        raise UserError(f"--stop-at-epoch {args.stop_at_epoch} ends inside the recipe trial's first {stop} epoch(s); "
                        f"pass a larger --stop-at-epoch, or --no-trial")
    # (the epochs are counted on the whole split, as measured in docs/payoff.md; an epoch shows the
    # images left after the payoff's holdout)
    seen = stop * len(pretraining_images(args, say=False))
    log(f"=> --recipe {args.recipe}: trial of {len(cands)} candidate recipes, {stop} epoch(s) ({seen:,} "
        f"images) each, scored by the payoff probe on the train labels (never val)")
    rows = []
    for i, cand in enumerate(cands):
        folder = os.path.join(args.output_dir, TRIAL_DIR, f"{i}")
        sub = _candidate_args(args, cand, folder, images)
        sub.stop_at_epoch = stop
        prepare_output_dir(folder, new_run=True, overwrite=True, lock=False)
        log(f"=> trial {i + 1}/{len(cands)}: {describe(cand)} (--epochs {sub.epochs})")
        t0 = time.time()
        try:
            launch(worker, sub)
        except SystemExit as e:  # a candidate that stops itself (not learning, a bad value) is scored as failed
            if e.code not in (None, 0):
                log(f"=> trial {i + 1}: stopped with status {e.code}; left out")
                continue
        with open(os.path.join(folder, PAYOFF_FILE)) as f:
            pay = json.load(f)
        v = pay["verdicts"]["untrained"]
        rows.append({"candidate": cand, "views": describe(cand), "epochs": sub.epochs, "folder": folder,
                     "top1": pay["final"]["top1"], "fold_std": pay["final"]["fold_std"],
                     "untrained_top1": pay["baselines"]["untrained"]["top1"], "gain": v["gain"],
                     "spread": v["spread"], "paid_off": v["paid_off"], "minutes": (time.time() - t0) / 60})
    if not rows:
        log("=> trial: every candidate stopped; the recipe's views are used unmeasured")
        return args
    best = choose(rows)
    table = "\n   ".join(f"{'*' if r is best else ' '} {r['views']:<58} {r['top1']:5.1f} +- {r['fold_std']:4.1f}  "
                         f"{r['gain']:+5.1f} over untrained ({r['untrained_top1']:.1f})  {r['minutes']:.1f} min"
                         for r in rows)
    log(f"=> trial (probe top-1 on the train labels, {seen:,} images seen each):\n   {table}")
    top = max(rows, key=lambda r: r["top1"])
    if top is not best:
        log(f"=> trial: the method's views pay off ({best['gain']:+.1f} against a spread of {best['spread']:.1f}), "
            f"so they are kept although {top['views']} scores {top['top1'] - best['top1']:.1f} higher this early: "
            f"weaker views lead a short trial and lose by the end of the budget (docs/payoff.md)")
    _write(args.output_dir, {"images_each": seen, "epochs_each": stop, "rows": rows,
                             "chosen": best["views"]})
    if not best["paid_off"]:
        log(f"=> WARNING: no candidate pays off on these images yet (the best gains {best['gain']:+.1f} against a "
            f"fold spread of {best['spread']:.1f}); try {WHAT_TO_TRY}")
        if args.stop_if_no_gain:
            log(f"=> --stop-if-no-gain: stopping after the trial; its runs are kept in "
                f"{os.path.join(args.output_dir, TRIAL_DIR)}")
            raise SystemExit(NO_GAIN_EXIT)
    return _continue(args, best, images)


def choose(rows: List[Dict]) -> Dict:
    """The method's views when they pay off in the trial, else the candidate the probe scores best.
    A short trial favours weaker views: on Fashion-MNIST they led the trial at every seed and lost
    to the method's views by the end of the budget (docs/payoff.md), so a candidate replaces the
    papers' views only when those do not pay off on the user's labels."""
    method = next((r for r in rows if not r["candidate"]), None)
    if method is not None and method["paid_off"]:
        return method
    return max(rows, key=lambda r: r["top1"])


def _continue(args: argparse.Namespace, best: Dict, images: int) -> argparse.Namespace:
    """The chosen candidate's args, resuming its trial run: its metrics and payoff baseline
    move into OUTPUT_DIR so the continued run's files read as one run."""
    chosen = _candidate_args(args, best["candidate"], args.output_dir, images)
    chosen.overwrite, chosen.trial, chosen.stop_at_epoch = args.overwrite, args.trial, args.stop_at_epoch
    chosen.export_at_end, chosen.payoff = args.export_at_end, args.payoff
    for name in ("metrics.jsonl", PAYOFF_FILE):
        shutil.copyfile(os.path.join(best["folder"], name), os.path.join(args.output_dir, name))
    chosen.resume = os.path.join(best["folder"], "checkpoint_last.pth.tar")
    log(f"=> --recipe {args.recipe} continues the trial's choice, {best['views']}, to --epochs {chosen.epochs}")
    return chosen


def _write(output_dir: str, doc: Dict) -> None:
    write_json_atomic(os.path.join(output_dir, TRIAL_FILE), doc)

