"""The pretraining scripts' shared flag groups (main_moco.py, main_moco_v3.py, main_simclr.py,
main_inpaint.py): the two-view methods' views, the pretraining run's monitors and stops,
and `--recipe` with its trial. Their derived defaults and checks: common/train/pretrain_args.py."""
import argparse

from common.cli.parser import switch

RECIPES = ("default", "small")


def add_view_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The "views" group of the two-view methods (MoCo, SimCLR): augmentation strength, crops,
    --gpu-augment, what to do when the contrastive task stays at chance, and --view-check-only
    (common/watch/view_check.py's view_check_only, the script's `script_main(instead=...)`)."""
    g = parser.add_argument_group("views")
    g.add_argument("--color-strength", default=1.0, type=float,
                   help="colour distortion strength s: SimCLR jitter 0.8s/0.8s/0.8s/0.2s, MoCo v2 "
                        "(--aug-plus) jitter 0.4s/0.4s/0.4s/0.1s; 1.0 is the papers' recipe")
    switch(g, "--gray-images",
           help="the images are grayscale: views get brightness and contrast jitter only (saturation, hue and random "
                "grayscale do nothing to a gray image); --recipe small sets it when every sampled image has equal "
                "channels")
    g.add_argument("--noise", default=0.0, type=float, metavar="S",
                   help="Gaussian noise on half the views, sigma ~ U(0, S) in units of each channel's std, added "
                        "after normalisation; for any --in-channels (default 0: off)")
    g.add_argument("--crop-min", default=None, type=float,
                   help="smallest RandomResizedCrop area fraction (default: the method's, 0.2 MoCo, 0.08 "
                        "SimCLR; raise it for small objects or low-resolution images)")
    g.add_argument("--crop-max", default=1.0, type=float,
                   help="largest RandomResizedCrop area fraction (default 1: the whole image); below 1 on "
                        "sources much larger than --crop-size, the views keep the source's fine detail")
    switch(g, "--gpu-augment", default=None,
           help="loader workers only decode, crop and flip; colour jitter, grayscale, blur and normalisation run "
                "batched on the training device (default: on with a GPU)")
    switch(g, "--gpu-decode",
           help="loader workers only read the files; JPEG decoding (nvJPEG), crop and flip run on the training "
                "device too, then --gpu-augment's ops: for a GPU faster than the loader cores can feed (e.g. with "
                "--compile; watch `data N%%` in the progress line)")
    switch(g, "--stop-if-not-learning",
           help="stop (exit status 3, checkpoint kept) when the contrastive accuracy stayed near chance for two "
                "epochs in a row (from the second epoch on, past the lr warmup); without it the epoch line warns "
                "and metrics.jsonl says not_learning")
    switch(g, "--view-check-only",
           help="only the view check a run prints before its first step (do an image's two views still look more "
                "alike than views of two images?), for the views this command would train with (--recipe small's "
                "choices included), then exit 0: nothing is trained or written (no output folder, no lock); for "
                "trying view settings in seconds")
    g.add_argument("--view-check-seeds", default=[0], type=int, nargs="+", metavar="S",
                   help="--view-check-only: one check per seed (another sample of images and views); several show "
                        "how much the figures move from one sample to the next")
    return g


def add_pretrain_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The "pretraining run" group every pretraining script takes: the kNN monitor, the payoff
    probe, --stop-at-epoch, --save-every-iters, --export-at-end and --init."""
    g = parser.add_argument_group("pretraining run")
    g.add_argument("--knn-every", default=0, type=int,
                   help="kNN accuracy of the backbone on the labelled train/val split every N epochs (0: off)")
    switch(g, "--payoff", default=True,
           help="when the train split has labels: a 5-fold logreg probe on them (never val) before training and at "
                "the end (and every --knn-every epochs) says whether pretraining beat the network it started from "
                "(OUTPUT_DIR/payoff.json)")
    g.add_argument("--payoff-holdout", default=0.2, type=float, metavar="FRACTION",
                   help="share of the labelled train images (whole --payoff-groups groups) kept out of pretraining, "
                        "1,000 images at most: the payoff probe is fitted on the other labelled images and scored "
                        "on these, which pretraining never saw, as val's are; 0: none kept out, a 5-fold probe on "
                        "images pretraining saw (an upper bound: it can memorise them) (default: 0.2)")
    g.add_argument("--payoff-groups", default=None, metavar="REGEX",
                   help="keep images of one group (a simulation, a part, a wafer) in one fold of the payoff "
                        "probe and the recipe trial: the regex's first group (else its match) in each file name "
                        "names the image's group, e.g. '^(s[0-9]+)_'; near-copies split across folds score the "
                        "probe on images it has all but seen")
    g.add_argument("--stop-at-epoch", default=0, type=int, metavar="N",
                   help="stop after N epochs of the --epochs schedule, checkpoint kept (--resume auto continues "
                        "the same schedule exactly; the recipe trial runs its candidates this way); 0: off")
    g.add_argument("--save-every-iters", default=0, type=int, metavar="N",
                   help="also write checkpoint_last.pth.tar every N iterations inside an epoch (0: only at "
                        "epoch ends); a killed job then loses at most N iterations")
    switch(g, "--export-at-end",
           help="after the last epoch, also write the backbone as OUTPUT_DIR/exported/backbone-<sha256[:8]>.pth + "
                ".json (export_backbone.py's torchvision format; torch.hub.load(<repo>, 'backbone', "
                "path=OUTPUT_DIR, source='local') loads it)")
    g.add_argument("--init", default=None, metavar="imagenet|PATH",
                   help="start the backbone (both MoCo encoders) from these weights and continue pretraining: "
                        "'imagenet' (torchvision's weights for -a, from the local torch hub cache only), a "
                        "torchvision state_dict, an export_backbone.py export, or any checkpoint main_lincls.py "
                        "takes; stored in the checkpoint, ignored by --resume")
    return g


def add_recipe_args(parser: argparse.ArgumentParser, what: str, trial: bool = True) -> argparse._ArgumentGroup:
    """The "recipe" group: --recipe (`what`: the small recipe in words) and, for the scripts
    that run it (`trial`), the recipe trial's flags (common/train/trial.py)."""
    g = parser.add_argument_group("recipe")
    g.add_argument("--recipe", default="default", choices=RECIPES,
                   help=f"small: {what}; on sources 3x the crop or larger it picks the views (crop scale, "
                        f"colour strength) by the view check (docs/small-data.md); flags you pass yourself "
                        f"are kept; every value it sets is printed "
                        f"and stored in the checkpoint; a resumed run keeps the values it started with")
    if not trial:
        return g
    switch(g, "--trial", default=True,
           help="--recipe small with train labels: train each candidate recipe briefly, score it with "
                "the payoff probe on the train labels (never val), continue the method's views when "
                "they pay off, else the best (OUTPUT_DIR/trial.json); --no-trial: the view check alone picks the views")
    switch(g, "--stop-if-no-gain",
           help="stop after the trial (exit status 4, the trial runs kept) when even the best candidate "
                "does not beat the untrained network by more than the fold spread")
    return g
