"""PNG figures with matplotlib (an optional extra): a run's curves from metrics.jsonl
(plot_run.py) and a 2-D map of embeddings coloured by class (main_knn.py
--plot-embeddings)."""
import json
import numbers
import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from common.errors import UserError
from common.extras import available, require
from common.files.atomic import atomic_path

# one panel each: (title, [(metrics key, legend), ...]); pretraining and lincls runs fill different keys
PANELS = [
    ("loss", [("loss", "train (pretext)"), ("train_loss", "train"), ("val_loss", "val")]),
    ("learning rate", [("lr", "lr")]),
    ("kNN top-1 (%)", [("knn_top1", "kNN top-1")]),
    ("top-1 (%)", [("acc1", "val (probe) / pretext"), ("train_acc1", "train (probe)")]),
]
CURVES_SIZE = (16, 4)  # inches, at 100 dpi: a 1600 x 400 PNG
JSON_TYPES = {list: "array", str: "string", int: "number", float: "number", bool: "true/false", type(None): "null"}


def _pyplot():
    matplotlib = require("matplotlib")
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt  # after use("Agg")
    return plt


def read_metrics(run_dir: str) -> List[Dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"{run_dir!r} has no metrics.jsonl; pass the --output-dir of a run of main_moco.py, "
                        f"main_simclr.py or main_lincls.py")
    records = []
    try:
        # a binary or foreign file then reads as lines of invalid JSON, not a UnicodeDecodeError
        with open(path, errors="replace") as f:
            lines = list(f)
    except OSError as e:
        raise UserError(f"cannot read {path} ({type(e).__name__}: {e.strerror or e}); check its permissions")
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError:  # a line cut by a kill mid-write
            continue
        problem = record_problem(record)
        if problem is not None:
            fix = ("fix or delete that line" if isinstance(record, dict) else "delete that line, or pass the "
                   "--output-dir of a run of main_moco.py, main_simclr.py or main_lincls.py")
            raise UserError(f"{path}, line {number}: {problem}; {fix}")
        records.append(record)
    if not records:
        raise UserError(f"{path} holds no finished epoch yet; plot it after the first epoch")
    return records


def record_problem(record: Any) -> Optional[str]:
    """Why one parsed line of metrics.jsonl is not an epoch record (a JSON object whose
    "epoch", if it has one, is a number), or None when it is one."""
    if not isinstance(record, dict):
        return f"a JSON {JSON_TYPES.get(type(record), 'value')} where an epoch record (a JSON object) belongs"
    epoch = record.get("epoch", 0)
    if isinstance(epoch, bool) or not isinstance(epoch, numbers.Real):  # True would sort as epoch 1
        return f"\"epoch\" is {json.dumps(epoch)}, not a number"
    return None


def save_figure(fig: Any, path: str) -> str:
    """fig.savefig(path), written to a temporary file beside it and moved into place (an
    earlier PNG stays whole if this fails), its folder created; an unwritable path is one
    sentence."""
    if os.path.isdir(path):
        raise UserError(f"{path} is a folder; name a file to write, e.g. {os.path.join(path, 'curves.png')}")
    fmt = os.path.splitext(path)[1][1:].lower() or "png"
    if fmt not in fig.canvas.get_supported_filetypes():
        raise UserError(f"matplotlib cannot write .{fmt} files ({path}); name the output .png, .pdf or .svg")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt)
    except OSError as e:
        raise UserError(f"cannot write {path} ({type(e).__name__}: {e.strerror or e}); "
                        f"choose a path in a folder you can write to")
    return path


def plot_curves(records: Sequence[Dict], path: str, title: str = "") -> str:
    """One row of panels (loss, lr, kNN top-1, top-1) against the epoch; a panel whose
    numbers this run does not log says so."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(PANELS), figsize=CURVES_SIZE, dpi=100)
    epochs = [r.get("epoch", i) + 1 for i, r in enumerate(records)]
    for ax, (name, series) in zip(axes, PANELS):
        drawn = False
        for key, label in series:
            points = [(e, r[key]) for e, r in zip(epochs, records) if isinstance(r.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=label)
                drawn = True
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged by this run", ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    try:
        return save_figure(fig, path)  # the figure's own size and dpi: CURVES_SIZE x 100
    finally:
        plt.close(fig)


def embedding_map(features: np.ndarray, method: str, seed: int = 0) -> np.ndarray:
    """N x 2 coordinates: PCA (always), t-SNE (scikit-learn) or UMAP (umap-learn)."""
    x = features.astype(np.float64)
    if method == "pca":
        x = x - x.mean(0)
        _, _, vt = np.linalg.svd(x, full_matrices=False)
        return x @ vt[:2].T
    if method == "tsne":
        manifold = require("sklearn.manifold")
        return manifold.TSNE(2, init="pca", random_state=seed, perplexity=min(30.0, max(2.0, len(x) / 4))
                             ).fit_transform(x)
    return require("umap").UMAP(n_components=2, random_state=seed).fit_transform(x)


def plot_embeddings(features: np.ndarray, labels: np.ndarray, classes: Sequence[str], path: str,
                    method: str = "pca", max_points: int = 5000, seed: int = 0) -> str:
    """A scatter of `features` (a random `max_points` of them) in 2-D, one colour per class."""
    plt = _pyplot()
    rng = np.random.default_rng(seed)
    keep = rng.permutation(len(features))[:max_points]
    xy, y = embedding_map(features[keep], method, seed), labels[keep]
    fig, ax = plt.subplots(figsize=(8, 8), dpi=100)
    cmap = plt.get_cmap("tab20" if len(classes) > 10 else "tab10")
    for c, name in enumerate(classes):
        m = y == c
        if m.any():
            ax.scatter(xy[m, 0], xy[m, 1], s=6, color=cmap(c % cmap.N), label=str(name))
    if 0 < len(classes) <= 30:
        ax.legend(markerscale=3, fontsize=8, loc="best")
    ax.set_title(f"embeddings ({method.upper()}, {len(keep)} images)")
    ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    try:
        return save_figure(fig, path)
    finally:
        plt.close(fig)


def embedding_methods() -> List[str]:
    """PCA, plus t-SNE / UMAP when their packages are installed."""
    return ["pca"] + [m for m, mod in (("tsne", "sklearn"), ("umap", "umap")) if available(mod)]
