"""What the bench scripts share: the machine description, median/ratio summaries, a
plain-text table, JSON output, a peak-RSS sampler for CPU runs, and IDX (MNIST-format)
files for Fashion-MNIST subsets and test fixtures."""
import json
import os
import platform
import resource
import statistics
import struct
import sys
import threading
import time
from typing import Dict, List, Sequence

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `python bench/x.py` from anywhere finds common/
    sys.path.insert(0, ROOT)


def machine_info(device: torch.device) -> Dict:
    """What a figure was measured on: CPU model and threads, GPU name, library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
    return info


def resolve_device(name: str) -> str:
    """--device auto -> cuda when a GPU is visible, else cpu; --device cuda without one is an error."""
    from common.errors import UserError
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but no GPU is visible; drop --device or use --device cpu")
    return name


def save_record(args, benchmark: str, device: torch.device, results: Dict, table: str, title: str = "",
                **extra) -> Dict:
    """The benchmark's JSON record (config, machine, results, the printed table) written to
    args.json; returns it."""
    record = {"benchmark": benchmark, "config": vars(args), "machine": machine_info(device), "results": results,
              "table": table, "title": title, **extra}
    write_json(args.json, record)
    print(f"=> {args.json}", flush=True)
    return record


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def format_table(header: Sequence[str], rows: List[Sequence]) -> str:
    """A plain left/right aligned text table (numbers right-aligned), usable as Markdown."""
    cells = [[str(h) for h in header]] + [[c if isinstance(c, str) else f"{c}" for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    def fmt(r):
        return "| " + " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([fmt(cells[0]), sep] + [fmt(r) for r in cells[1:]])


def write_json(path: str, record: Dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, path)


# ---------------------------------------------------------------- memory

def current_rss() -> int:
    """Resident set size of this process in bytes (Linux /proc; ru_maxrss elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakRSS:
    """Peak RSS growth over a block, sampled every `interval` s by a thread. ru_maxrss is
    the process's lifetime peak, so it cannot tell configurations run in one process
    apart; the sampled delta can (it may miss a peak shorter than the interval)."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak, self.start = interval, 0, 0
        self._stop = threading.Event()

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = current_rss()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss())

    @property
    def delta(self) -> int:
        return self.peak - self.start


# ---------------------------------------------------------------- IDX files (MNIST / Fashion-MNIST)

def write_idx(path: str, array: np.ndarray) -> None:
    """Write a uint8 array in the IDX format MNIST and Fashion-MNIST ship in (magic
    0x0000 08 <ndim>, big-endian int32 sizes, then the bytes)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack(">BBBB", 0, 0, 0x08, array.ndim))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.tobytes())


def write_mnist_layout(root: str, train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray,
                       test_labels: np.ndarray, folder: str = "FashionMNIST") -> str:
    """`root/<folder>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`: the layout
    torchvision's MNIST/FashionMNIST read with download=False. Returns root."""
    raw = os.path.join(root, folder, "raw")
    write_idx(os.path.join(raw, "train-images-idx3-ubyte"), train_images)
    write_idx(os.path.join(raw, "train-labels-idx1-ubyte"), train_labels)
    write_idx(os.path.join(raw, "t10k-images-idx3-ubyte"), test_images)
    write_idx(os.path.join(raw, "t10k-labels-idx1-ubyte"), test_labels)
    return root


def stratified_first(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Indices of n samples with the classes as balanced as the data allows (a fixed
    random draw per class), sorted."""
    if n <= 0 or n >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in classes]
    take = [p[: n // len(classes) + (1 if i < n % len(classes) else 0)] for i, p in enumerate(per_class)]
    return np.sort(np.concatenate(take))


def mnist_subset(src_root: str, dst_root: str, train_n: int, test_n: int, dataset: str = "fashion-mnist",
                 seed: int = 0) -> str:
    """A class-balanced subset of an MNIST-format dataset written in torchvision's layout
    under dst_root, for budgets that cannot afford the 60k/10k images. Returns dst_root."""
    import torchvision.datasets as tvd

    from common.errors import UserError

    cls, folder = (tvd.FashionMNIST, "FashionMNIST") if dataset == "fashion-mnist" else (tvd.MNIST, "MNIST")
    try:
        train, test = cls(src_root, train=True), cls(src_root, train=False)
    except RuntimeError as e:
        raise UserError(f"{dataset} was not found under {src_root!r} ({e}); pass the folder that holds "
                        f"{folder}/raw/ (e.g. ../shared/data/fashion-mnist)")
    tr_x, tr_y = train.data.numpy(), train.targets.numpy()
    te_x, te_y = test.data.numpy(), test.targets.numpy()
    tr_i, te_i = stratified_first(tr_y, train_n, seed), stratified_first(te_y, test_n, seed)
    return write_mnist_layout(dst_root, tr_x[tr_i], tr_y[tr_i], te_x[te_i], te_y[te_i], folder)


def texture_jpeg(width: int, height: int, seed: int) -> bytes:
    """A smooth random-texture JPEG (quality 90): it compresses and decodes like a
    photograph, unlike white noise."""
    import io

    from PIL import Image
    rng = np.random.default_rng(seed)
    small = rng.uniform(0, 255, size=(height // 16 + 1, width // 16 + 1, 3)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize((width, height), Image.BICUBIC).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _write_jpeg(job) -> None:
    path, width, height, seed = job
    with open(path, "wb") as f:
        f.write(texture_jpeg(width, height, seed))


PARALLEL_JPEGS = 256  # fewer files are written in this process: a pool's start-up costs more


def write_jpegs(folder: str, n: int, width: int, height: int, classes: int = 1, seed: int = 0) -> str:
    """n texture_jpeg files of width x height in `classes` class folders (an ImageFolder),
    written by every core. Returns folder."""
    import multiprocessing
    jobs = []
    for i in range(n):
        d = os.path.join(folder, f"c{i % classes}")
        os.makedirs(d, exist_ok=True)
        jobs.append((os.path.join(d, f"{i:06d}.jpg"), width, height, seed * 1_000_003 + i))
    if n <= PARALLEL_JPEGS:  # a forked pool inside a test process once hung on a worker that died
        for job in jobs:
            _write_jpeg(job)
        return folder
    with multiprocessing.Pool(min(os.cpu_count() or 1, 16)) as pool:
        pool.map(_write_jpeg, jobs, chunksize=16)
    return folder


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_block(device: torch.device):
    """Context manager measuring peak memory of a block: torch.cuda.max_memory_allocated
    growth on a GPU, sampled peak RSS growth on a CPU. `.bytes` after the block."""
    class _Block:
        bytes = 0

        def __enter__(self):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            else:
                self._rss = PeakRSS().__enter__()
            return self

        def __exit__(self, *exc):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                self.bytes = torch.cuda.max_memory_allocated(device)
            else:
                self._rss.__exit__(*exc)
                self.bytes = self._rss.delta

    return _Block()


