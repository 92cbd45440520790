"""The checkpoint contract, defined here: what a checkpoint holds (training_state's dict),
atomic writes that never destroy the last good file, reading with a plain error, and
restoring model, optimizer, scaler and RNG state. Which checkpoint to resume is
common/ckpt/resume.py; backbones for evaluation common/ckpt/pretrained.py."""
import argparse
import os
import random
import re
import shutil
import tempfile
from typing import Any, Dict, List, Optional, Pattern, Tuple

import numpy as np
import torch
import torch.nn as nn

from common.errors import UserError, reason
from common.files import lock as run_lock
from common.files.atomic import atomic_path

METHODS = ("moco", "moco_v3", "simclr", "byol", "simsiam", "dino", "distill", "inpaint", "lincls")
SCRIPTS = {"moco": "main_moco.py", "moco_v3": "main_moco_v3.py", "simclr": "main_simclr.py", "byol": "main_byol.py",
           "simsiam": "main_byol.py", "dino": "main_dino.py", "distill": "main_distill.py", "inpaint": "main_inpaint.py",
           "lincls": "main_lincls.py"}


# ---------------------------------------------------------------- writing

LOW_DISK_BYTES = 256 * 2**20


def save_atomic(state: Dict[str, Any], path: str) -> None:
    """torch.save to a temp file in the same folder, fsync, rename: a crash mid-write
    leaves the previous file intact."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    try:
        # `.tmp_*.pth.tar`: the names prepare_output_dir clears after a kill mid-write
        with atomic_path(path, prefix=".tmp_", suffix=".pth.tar") as tmp:
            with open(tmp, "wb") as f:
                torch.save(state, f)
    except (OSError, RuntimeError) as e:
        free = shutil.disk_usage(folder).free
        # a full disk surfaces as OSError, or from torch's zip writer as a RuntimeError
        # ("unexpected pos ...") deep in torch.serialization
        if isinstance(e, OSError) or free < LOW_DISK_BYTES:
            kept = "the previous one is intact" if os.path.exists(path) else "no earlier one existed"
            raise UserError(f"could not write the checkpoint {path} ({str(e).strip() or type(e).__name__}; "
                            f"{free / 2**20:.0f} MiB free on that disk): free some space or use another "
                            f"--output-dir, then --resume; {kept}") from e
        raise


# what a run leaves in its --output-dir (a new run would overwrite or empty them)
RUN_FILE = re.compile(r"^(checkpoint_last|checkpoint_\d+|model_best)\.pth\.tar$|^metrics\.jsonl$|^results\.json$")


def previous_run_files(output_dir: str, run_files: Pattern = RUN_FILE) -> List[str]:
    """The files of an earlier run in `output_dir` (by default a training run's checkpoints,
    metrics log and results; evaluation scripts pass the names they write)."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(n for n in os.listdir(output_dir) if run_files.match(n)
                  and not (n == "metrics.jsonl" and os.path.getsize(os.path.join(output_dir, n)) == 0))


def prepare_output_dir(output_dir: str, new_run: bool = False, overwrite: bool = False, lock: bool = True,
                       run_files: Pattern = RUN_FILE, resume_hint: str = "--resume auto to continue it") -> None:
    """Before any work: the folder exists (or can be made) and can be written, this run holds
    its lock (common/files/lock.py: `lock` is true in the run's first process only), and the
    temp files of checkpoint writes a kill interrupted (`.tmp_*.pth.tar`) are removed. For a
    `new_run` a folder that holds an earlier run's `run_files` is refused unless `overwrite`
    says to replace them: a forgotten --resume must not wipe a finished run, and a rerun must
    not leave the earlier run's outputs beside its own."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UserError(f"--output-dir {output_dir!r} is a file, not a folder; pass a folder path")
    try:
        os.makedirs(output_dir, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_probe_", dir=output_dir)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to --output-dir {output_dir!r} ({e.strerror}); pass a folder you can write to")
    if lock:  # before anything is removed: a second run must not delete the first one's files
        run_lock.acquire(output_dir)
    earlier = previous_run_files(output_dir, run_files) if new_run else []
    if earlier and not overwrite:
        raise UserError(f"--output-dir {output_dir!r} already holds a run ({', '.join(earlier[:3])}"
                        f"{', ...' if len(earlier) > 3 else ''}); pass {resume_hint}, another "
                        f"--output-dir for a new run, or --overwrite to replace it")
    if earlier:
        for name in earlier:  # the old checkpoint_NNNN files would otherwise sit among the new run's
            path = os.path.join(output_dir, name)
            try:
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            except FileNotFoundError:  # another process of the same run (torchrun, srun) removed it first
                pass
        print(f"=> --overwrite: removed the earlier run's {', '.join(earlier)} from {output_dir}", flush=True)
    stale = [n for n in os.listdir(output_dir) if (n.startswith(".tmp_") and n.endswith(".pth.tar"))
             or n.endswith(".tmp_link")]
    for name in stale:
        try:
            os.remove(os.path.join(output_dir, name))
        except FileNotFoundError:  # another rank of the same run removed it first
            pass
    if stale:
        print(f"=> removed {len(stale)} unfinished checkpoint write(s) ({', '.join(stale[:3])}) from {output_dir}",
              flush=True)


def checkpoint_bytes(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> int:
    """About how large one checkpoint of `model` (and its optimizer's state, known before the
    first step: one tensor per trainable parameter, two for Adam) will be on disk."""
    n = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if optimizer is not None:
        per_param = 2 if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)) else 1
        n += per_param * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return n + 2 ** 20


def check_free_space(output_dir: str, needed: int, what: str = "one checkpoint") -> None:
    free = shutil.disk_usage(output_dir).free
    if free < needed:
        raise UserError(f"--output-dir {output_dir!r} has {free / 2 ** 20:.0f} MiB free but {what} needs about "
                        f"{needed / 2 ** 20:.0f} MiB; free some space or pass another --output-dir")


def save_checkpoint(state: Dict[str, Any], output_dir: str, epoch_file: bool = True,
                    is_best: bool = False) -> str:
    """Write `checkpoint_last.pth.tar` (+ `checkpoint_{epoch:04d}` and `model_best`)."""
    last = os.path.join(output_dir, "checkpoint_last.pth.tar")
    save_atomic(state, last)
    extra = []
    if epoch_file:
        extra.append(os.path.join(output_dir, f"checkpoint_{state['epoch']:04d}.pth.tar"))
    if is_best:
        extra.append(os.path.join(output_dir, "model_best.pth.tar"))
    for path in extra:
        # a hard link costs no space or time; copy where links are not allowed
        tmp = path + ".tmp_link"
        try:
            if os.path.exists(tmp):
                os.remove(tmp)
            os.link(last, tmp)
            os.replace(tmp, path)
        except OSError:
            save_atomic(state, path)
    return last


def model_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """State dict with the DDP `module.` prefix, whether or not the model is wrapped."""
    sd = model.state_dict()
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return sd
    return {"module." + k: v for k, v in sd.items()}


def load_model_state(model: nn.Module, state_dict: Dict[str, torch.Tensor]) -> None:
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        state_dict = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    model.load_state_dict(state_dict)


# ---------------------------------------------------------------- RNG

def rng_state() -> Dict[str, Any]:
    """Every RNG a run draws from, in types that load with weights_only=True."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": random.getstate(),
    }


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


# ---------------------------------------------------------------- reading

# flags whose dest was renamed since checkpoints stored it: old dest -> (new dest, whether the
# new flag is the old one's negation). A checkpoint's stored args read as today's names, so a
# resumed run, follow_checkpoint and export see one name (issue 41: --no-flip -> --flip/--no-flip)
RENAMED_ARGS = {"no_flip": ("flip", True)}


def current_args(saved: Dict[str, Any]) -> Dict[str, Any]:
    """A checkpoint's stored args with the RENAMED_ARGS under their new dests."""
    args = dict(saved)
    for old, (new, negated) in RENAMED_ARGS.items():
        if old in args:
            value = args.pop(old)
            args.setdefault(new, (not value) if negated and isinstance(value, bool) else value)
    return args


# the one pickled class a checkpoint may hold besides tensors and plain values: facebookresearch/dino's
# (and other reference repos') full checkpoints store their flags as an argparse.Namespace under "args"
SAFE_GLOBALS = [argparse.Namespace]


def safe_load(path: str, mmap: bool = False) -> Any:
    """torch.load with weights_only=True, which also allows SAFE_GLOBALS (argparse.Namespace:
    plain attributes, no code runs); any other pickled object is still refused."""
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


def load_checkpoint(path: str, expected_method: Optional[str] = None, mmap: bool = False) -> Dict[str, Any]:
    """Load safely (weights_only) and check that the right script wrote it. `mmap`: map the
    tensors instead of reading them (cheap when only the metadata is needed)."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path!r} does not exist; check the path (or use --resume auto)")
    try:
        ckpt = safe_load(path, mmap=mmap)
    except Exception as e:  # truncated files, pickles of foreign classes, not a torch file
        if "Weights only load failed" in str(e):
            raise UserError(f"cannot read checkpoint {path!r}: it holds pickled Python objects besides tensors, and "
                            f"loading those could run arbitrary code, so it was refused (weights_only); this repository "
                            f"writes only tensors and plain values: if you trust the file, load it yourself and "
                            f"save its state_dict again")
        raise UserError(f"cannot read checkpoint {path!r} ({reason(e)}); "
                        f"it is damaged or not a checkpoint of this repository")
    ckpt = with_dino_state_dict(ckpt)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise UserError(f"{path!r} is not a training checkpoint (no 'state_dict'); "
                        f"pass a .pth.tar written by main_moco.py, main_simclr.py or main_lincls.py")
    if isinstance(ckpt.get("args"), argparse.Namespace):  # a reference repo's flags: a dict, as ours
        ckpt["args"] = vars(ckpt["args"])
    if isinstance(ckpt.get("args"), dict):
        ckpt["args"] = current_args(ckpt["args"])
    method = ckpt.get("method")
    if expected_method is not None and method != expected_method:
        wrote = SCRIPTS.get(method, "another program")
        raise UserError(f"{path!r} was written by {wrote}, but {SCRIPTS[expected_method]} can only "
                        f"resume its own checkpoints; pass one from a {SCRIPTS[expected_method]} run")
    return ckpt


def with_dino_state_dict(ckpt: Any) -> Any:
    """facebookresearch/dino's checkpoint ({"student": ..., "teacher": ...}, no state_dict): its
    teacher as the state_dict, the network DINO's own evaluation takes (--checkpoint_key
    teacher); anything else as it is."""
    if isinstance(ckpt, dict) and "state_dict" not in ckpt and isinstance(ckpt.get("teacher"), dict):
        return {**ckpt, "state_dict": ckpt["teacher"]}
    return ckpt


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer, scaler, args, *, method: str,
                   epoch: int, iteration: int = 0, metrics: Optional[Dict[str, Any]] = None,
                   **extra: Any) -> Dict[str, Any]:
    """The checkpoint dict every script writes and resumes from: epoch, iteration, arch,
    method, state_dict, optimizer, scaler, args (the plain-valued flags), rng, metrics, plus
    the script's `extra` keys. `epoch` is the next epoch to run, or the current one when
    `iteration` > 0 (a mid-epoch checkpoint: that many iterations are done)."""
    return {
        "epoch": epoch, "iteration": iteration, "arch": args.arch, "method": method,
        "state_dict": model_state_dict(model), "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "args": {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool, list, tuple, type(None)))},
        "rng": rng_state(), "metrics": metrics or {}, **extra,
    }


def restore_training_state(ckpt: Dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer,
                           scaler=None) -> Tuple[int, int]:
    """Load model, optimizer, scaler and RNG from `ckpt`; returns (epoch, iteration) to continue at."""
    load_model_state(model, ckpt["state_dict"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if "rng" in ckpt:
        set_rng_state(ckpt["rng"])
    return int(ckpt["epoch"]), int(ckpt.get("iteration", 0))
