"""A class-balanced Fashion-MNIST (or MNIST) subset written as an ImageFolder of PNGs
(OUT/train/<class>/, OUT/val/<class>/), so the README's commands run on it as on a user's own
folder: `bench/quality.py OUT --dataset folder` measures the README's `--recipe small` run
(its trial on the labels included), which the IDX subsets of `--dataset fashion-mnist` do not.

    python bench/mnist_folder.py ../shared/data/fashion-mnist runs/fmnist2k --train 2000 --val 2000
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python bench/x.py` from anywhere finds common/
    sys.path.insert(0, ROOT)

from bench.util import stratified_first  # noqa: E402


def write_folder(src_root: str, out: str, train_n: int, val_n: int, dataset: str = "fashion-mnist",
                 seed: int = 0) -> str:
    """Writes the subsets (train from the train split, val from the test split) as 8-bit
    grayscale PNGs named `<split>_<index>.png` after their index in the source split."""
    import torchvision.datasets as tvd
    from PIL import Image

    from common.errors import UserError

    cls = tvd.FashionMNIST if dataset == "fashion-mnist" else tvd.MNIST
    try:
        splits = {"train": cls(src_root, train=True), "val": cls(src_root, train=False)}
    except RuntimeError as e:
        raise UserError(f"{dataset} was not found under {src_root!r} ({e}); pass the folder that holds its raw/ "
                        f"folder (e.g. ../shared/data/fashion-mnist)")
    for split, n in (("train", train_n), ("val", val_n)):
        data = splits[split]
        images, labels = data.data.numpy(), data.targets.numpy()
        for i in stratified_first(labels, n, seed):
            folder = os.path.join(out, split, data.classes[labels[i]].replace("/", "-"))
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(images[i], mode="L").save(os.path.join(folder, f"{split}_{i:05d}.png"))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", help="folder holding FashionMNIST/raw/ (or MNIST/raw/)")
    p.add_argument("out", help="the ImageFolder to write (train/, val/)")
    p.add_argument("--dataset", default="fashion-mnist", choices=("fashion-mnist", "mnist"))
    p.add_argument("--train", type=int, default=2000, help="train images, class-balanced (0: all)")
    p.add_argument("--val", type=int, default=2000, help="val images from the test split, class-balanced (0: all)")
    p.add_argument("--seed", type=int, default=0, help="which images each class gives")
    args = p.parse_args(argv)
    if os.path.exists(args.out):
        sys.exit(f"{args.out} exists; pass a new folder (this script never writes into an existing one)")
    write_folder(args.data, args.out, args.train, args.val, args.dataset, args.seed)
    print(f"=> wrote {args.out}/train and {args.out}/val")


if __name__ == "__main__":
    main()
