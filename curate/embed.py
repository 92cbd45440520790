"""Every image embedded once, resumably: each split is cut into shards of --shard-size
images whose features are written to OUTPUT_DIR/embeddings/ beside a manifest naming the
model and the files, so a rerun after an interruption embeds only the shards not yet
written (a changed model or file list starts over). A shard holds features and dataset
indices only: labels, splits and paths are read from DATA on every run."""
import argparse
import contextlib
import hashlib
import json
import os
import re
import signal
import sys
from typing import Callable, Iterator, List, Sequence, Tuple

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from common.data.channels import channels_of
from common.distributed.collectives import DistEnv, barrier, is_main_process
from common.eval.embeddings import embed, path_of
from common.files.atomic import atomic_path
from common.log.progress import log

EMBEDDINGS = "embeddings"  # the folder in OUTPUT_DIR: <split>_manifest.json and <split>_NNNNN.pt
SHARD = re.compile(r"^(.+)_(manifest\.json|\d{5}\.pt)$")


class Slice(Dataset):
    """Images [start, stop) of `base`, with their paths and labels."""

    def __init__(self, base: Dataset, start: int, stop: int):
        self.base, self.start, self.stop = base, start, stop
        self.targets = list(base.targets[start:stop])
        self.classes = list(getattr(base, "classes", []) or [])

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: int):
        return self.base[self.start + index]

    def path(self, index: int) -> str:
        return path_of(self.base, self.start + index)


def fingerprint(dataset: Dataset, args: argparse.Namespace) -> dict:
    """What the features depend on: the model, the eval view and the list of files."""
    pretrained = args.pretrained
    stamp = None
    if pretrained not in ("none", "imagenet") and os.path.isfile(pretrained):
        st = os.stat(pretrained)
        stamp = [os.path.abspath(pretrained), st.st_size, st.st_mtime_ns]
    files = hashlib.sha256("\n".join(path_of(dataset, i) for i in range(len(dataset))).encode()).hexdigest()
    ch = channels_of(args)
    return {"pretrained": pretrained, "checkpoint": stamp, "arch": args.arch, "crop_size": args.crop_size,
            "small_images": bool(args.small_images), "seed": args.seed if pretrained == "none" else None,
            "images": len(dataset), "files_sha256": files, "shard_size": args.shard_size,
            # the eval view of --in-channels other than 3 (a random or ImageNet init's first layer and
            # the normalisation follow it); absent for RGB, so earlier RGB shards are still reused
            **({"in_channels": ch.count, "channel_mean": list(ch.mean), "channel_std": list(ch.std),
                "per_image": ch.per_image} if ch.full_depth else {})}


def embed_split(model: nn.Module, dataset: Dataset, split: str, args: argparse.Namespace, env: DistEnv,
                batch_size: int, workers: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(features fp16 on the device, labels, dataset index of each row) of `dataset`, shard
    by shard; shards already in OUTPUT_DIR/embeddings/ under the same fingerprint are read
    back instead of embedded again."""
    folder = os.path.join(args.output_dir, EMBEDDINGS)
    manifest = os.path.join(folder, f"{split}_manifest.json")
    want = fingerprint(dataset, args)
    try:
        with open(manifest) as f:
            fresh = json.load(f) == want
    except (OSError, ValueError):
        fresh = False
    barrier()  # every rank has read the old manifest before rank 0 replaces it
    if not fresh and is_main_process():
        os.makedirs(folder, exist_ok=True)
        forget_shards(folder, lambda s: s == split)  # another model's shards past this run's last one
        with atomic_path(manifest) as tmp, open(tmp, "w") as f:
            json.dump(want, f, indent=1)
    barrier()
    feats: List[torch.Tensor] = []
    labels: List[torch.Tensor] = []
    index: List[torch.Tensor] = []
    starts = list(range(0, len(dataset), args.shard_size))
    reused = 0
    for s, start in enumerate(starts):
        path = os.path.join(folder, f"{split}_{s:05d}.pt")
        if fresh and os.path.isfile(path):
            shard = torch.load(path, map_location="cpu", weights_only=True)
            f_, i_ = shard["features"].to(env.device), shard["index"]
            # the labels are read from DATA on every run, never from the cache: a label fixed since
            # (a csv edited, as the report suggests) is judged as it is now
            l_ = torch.tensor([dataset.targets[i] for i in i_.tolist()], dtype=torch.long)
            reused += 1
        else:
            stop = min(start + args.shard_size, len(dataset))
            desc = split + (f" shard {s + 1}/{len(starts)}" if len(starts) > 1 else "")
            f_, l_, i_ = embed(model, Slice(dataset, start, stop), desc, args, env, batch_size, workers)
            l_, i_ = l_.cpu(), i_.cpu() + start
            if is_main_process():
                with atomic_path(path) as tmp:
                    torch.save({"features": f_.cpu(), "index": i_}, tmp)
        feats.append(f_)
        labels.append(l_)
        index.append(i_)
    if reused:
        log(f"=> {split}: {reused} of {len(starts)} embedding shard(s) reused from {folder}/")
    return torch.cat(feats), torch.cat(labels), torch.cat(index)


def forget_shards(folder: str, which: Callable[[str], bool]) -> List[str]:
    """Remove the manifest and shards of the splits `which` names from `folder`; the names removed."""
    if not os.path.isdir(folder):
        return []
    names = sorted(n for n in os.listdir(folder) if (m := SHARD.match(n)) and which(m.group(1)))
    for name in names:
        os.remove(os.path.join(folder, name))
    return names


def keep_splits(output_dir: str, splits: Sequence[str]) -> None:
    """--resume: the shards of a split this run does not have (an earlier --unlabelled pool)
    go, so OUTPUT_DIR/embeddings/ holds this run's splits only."""
    gone = forget_shards(os.path.join(output_dir, EMBEDDINGS), lambda s: s not in splits)
    if gone:
        log(f"=> removed the embeddings of split(s) this run does not have: {', '.join(gone)}")


class Stopped(BaseException):
    """A stop signal, raised where the worker is (a BaseException: no `except Exception` on the
    way takes it for an error of its own)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def stop_with_a_sentence(output_dir: str) -> Iterator[None]:
    """SIGTERM (a scheduler, `kill`), SIGUSR1 (SLURM's warning, and what --multiprocessing-distributed
    passes a `kill` on to its workers as) or Ctrl-C inside the block: rank 0 says which shards are
    kept and that the same command with --resume continues from them, and the process exits
    128 + the signal's number (143 for SIGTERM), the status a shell gives a killed command. The
    default action would end it as silently as a crash."""
    owner = os.getpid()
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}

    def stop(signum, frame):
        if os.getpid() != owner:  # a data-loading worker forked meanwhile: the main process decides
            return
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # SLURM signals every process and spawn forwards too
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second kill ends it at once
        raise Stopped(signum)

    for s in previous:
        signal.signal(s, stop)
    try:
        yield
    except (Stopped, KeyboardInterrupt) as e:
        signum = e.signum if isinstance(e, Stopped) else signal.SIGINT
        if is_main_process():
            folder = os.path.join(output_dir, EMBEDDINGS)
            shards = len([n for n in os.listdir(folder) if n.endswith(".pt")]) if os.path.isdir(folder) else 0
            prog = os.path.basename(sys.argv[0]) or "python"
            print(f"{prog}: stopped by {signal.Signals(signum).name}; the {shards} embedding shard(s) written so far "
                  f"are kept in {folder}/: run the same command with --resume to continue from them",
                  file=sys.stderr, flush=True)
        raise SystemExit(128 + signum) from None
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
