"""What users look at while a run goes: a progress line (loss, accuracy, lr, images/s,
ETA) and a JSON-lines metrics log. Only global rank 0 prints or writes."""
import datetime
import json
import os
import time
from typing import Dict, Iterable, Iterator, Optional

import torch

from common.distributed.collectives import all_reduce_sum, is_main_process
from common.files.atomic import atomic_path
from common.log.plots import record_problem
from common.log.tensorboard import TensorBoardLog


# the run's ETA is printed once this many steps after the first (whose start-up, worker
# launch and allocator or cuDNN warm-up, is not the rate of the rest)
ETA_AFTER_STEPS = 5


def log(msg: str) -> None:
    if is_main_process():
        print(msg, flush=True)


def format_seconds(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


class MeterBank:
    """Running sums kept as device tensors: adding costs no host sync; values are read
    (and averaged over ranks) only when a line is printed."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sums: Dict[str, torch.Tensor] = {}
        self.last: Dict[str, torch.Tensor] = {}
        self.count = 0

    def update(self, n: int, **values: torch.Tensor) -> None:
        for k, v in values.items():
            v = v.detach().float()
            self.last[k] = v
            self.sums[k] = self.sums.get(k, torch.zeros((), device=self.device)) + v * n
        self.count += n

    def averages(self, across_ranks: bool = True) -> Dict[str, float]:
        if not self.sums:
            return {}
        names = sorted(self.sums)
        vec = torch.stack([self.sums[k] for k in names] + [torch.tensor(float(self.count), device=self.device)])
        if across_ranks:
            vec = all_reduce_sum(vec.clone())
        vec = vec.tolist()
        return {k: vec[i] / max(vec[-1], 1) for i, k in enumerate(names)}

    def latest(self) -> Dict[str, float]:
        return {k: float(v) for k, v in self.last.items()}


class Progress:
    """`Epoch [3/100][ 40/500] loss 6.21 (6.54) acc1 12.3 (10.1) lr 0.0300 1523 img/s data 4% eta 0:12:03 (run 2:01:00)`.

    "data" is the share of the wall time spent waiting for the next batch (iterate the
    loader through `timed`): near 0 the device is the bottleneck, near 100 % the loader
    is (more -j, --gpu-augment)."""

    def __init__(self, epoch: int, epochs: int, iters: int, start_iter: int = 0, prefix: str = "Epoch"):
        self.epoch, self.epochs, self.iters, self.start_iter = epoch, epochs, iters, start_iter
        self.prefix = prefix
        self.t0 = time.time()
        self.data_wait = 0.0
        self.t_first_done: Optional[float] = None  # when the epoch's first step ended

    def timed(self, loader: Iterable) -> Iterator:
        """Yields the loader's batches, adding the time spent waiting for each to data_wait."""
        batches = iter(loader)
        yielded = 0
        while True:
            t = time.perf_counter()
            if yielded == 1:  # the next batch is asked for when the first step is done
                self.t_first_done = time.time()
            try:
                batch = next(batches)
            except StopIteration:
                return
            self.data_wait += time.perf_counter() - t
            yielded += 1
            yield batch

    def data_wait_share(self) -> float:
        return self.data_wait / max(time.time() - self.t0, 1e-9)

    def run_eta(self, it: int) -> Optional[str]:
        """After step `it` of this epoch: once ETA_AFTER_STEPS steps past the first (or at the
        epoch's end if it is shorter), a line with the run's ETA at the rate of the steps after
        the first; else None. Call it only in the first epoch a process trains."""
        since_first = it - self.start_iter
        remaining = (self.iters - it - 1) + self.iters * (self.epochs - self.epoch - 1)
        if remaining == 0 or not (since_first == ETA_AFTER_STEPS
                                  or (it + 1 == self.iters and since_first < ETA_AFTER_STEPS)):
            return None
        if torch.cuda.is_initialized():  # the steps so far were only queued, not necessarily run
            torch.cuda.synchronize()
        if since_first > 0 and self.t_first_done is not None:
            sec_per_iter, measured = (time.time() - self.t_first_done) / since_first, f"steps 2-{since_first + 1}"
        else:
            sec_per_iter, measured = time.time() - self.t0, "its one step, start-up included"
        return (f"=> ETA: about {format_seconds(sec_per_iter * remaining)} for the run's remaining {remaining} steps "
                f"at {sec_per_iter:.3g} s/step (measured on {measured}; evaluation and checkpoints come on top)")

    def line(self, it: int, images_seen: int, latest: Dict[str, float], avg: Dict[str, float], lr: float) -> str:
        elapsed = time.time() - self.t0
        done = it + 1 - self.start_iter
        sec_per_iter = elapsed / max(done, 1)
        eta_epoch = sec_per_iter * (self.iters - it - 1)
        eta_run = eta_epoch + sec_per_iter * self.iters * (self.epochs - self.epoch - 1)
        w = len(str(self.iters))
        stats = "  ".join(f"{k} {latest[k]:.4g} ({avg.get(k, latest[k]):.4g})" for k in sorted(latest))
        return (f"{self.prefix} [{self.epoch}/{self.epochs}][{it + 1:>{w}}/{self.iters}]  {stats}  lr {lr:.4g}  "
                f"{images_seen / max(elapsed, 1e-9):.0f} img/s  data {100 * self.data_wait_share():.0f}%  eta {format_seconds(eta_epoch)} "
                f"(run {format_seconds(eta_run)})")


class MetricsLog:
    """Appends one JSON object per line to `<output_dir>/metrics.jsonl` (rank 0 only); with
    `tensorboard`, the same numbers (per epoch) and the step loop's (per progress line) go
    to TensorBoard too."""

    def __init__(self, output_dir: str, name: str = "metrics.jsonl", tensorboard: bool = False):
        self.path = os.path.join(output_dir, name)
        if is_main_process():
            os.makedirs(output_dir, exist_ok=True)
        self.tensorboard = TensorBoardLog(output_dir, tensorboard)

    def drop_epochs_from(self, epoch: int) -> None:
        """Forget the lines of `epoch` and later (a resumed run writes them again). A last
        line cut by a kill mid-write goes too; any other line that is not an epoch record
        is kept as it is, with one warning line: the run goes on either way."""
        if not is_main_process() or not os.path.isfile(self.path):
            return
        # surrogateescape and newline="": a line torn through a multibyte character, or
        # someone's \r\n, is read without an error and written back byte for byte
        with open(self.path, encoding="utf-8", errors="surrogateescape", newline="") as f:
            lines = f.readlines()
        keep, odd = [], []
        for number, line in enumerate(lines, 1):
            last = number == len(lines)
            try:
                record = json.loads(line)
            except ValueError:
                if last and not line.endswith("\n"):  # write() ends every line it finishes with one
                    odd.append(f"line {number}: cut off mid-write; dropped it")
                    continue
                if line.strip():
                    odd.append(f"line {number}: not JSON; kept it as it is")
                keep.append(line)
                continue
            problem = record_problem(record)
            if problem is None:
                if record.get("epoch", -1) >= epoch:
                    continue
            else:
                odd.append(f"line {number}: {problem}; kept it as it is")
            # the next write() appends: without a newline its record would join this one
            keep.append(line if line.endswith("\n") else line + "\n")
        if odd:
            more = f"; and {len(odd) - 3} more such line(s)" if len(odd) > 3 else ""
            print(f"=> warning: {self.path}, {'; '.join(odd[:3])}{more}", flush=True)
        if keep != lines:
            with atomic_path(self.path) as tmp:
                with open(tmp, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
                    f.writelines(keep)

    def write(self, record: Dict) -> None:
        if not is_main_process():
            return
        self.tensorboard.scalars(record, int(record.get("epoch", 0)), "epoch")
        record = {"time": datetime.datetime.now().isoformat(timespec="seconds"), **record}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def step(self, global_step: int, values: Dict[str, float]) -> None:
        """The step loop's numbers at a progress line (TensorBoard only: metrics.jsonl keeps
        one line per epoch)."""
        self.tensorboard.scalars(values, global_step, "step")
