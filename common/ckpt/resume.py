"""`--resume PATH|auto` before the run starts: which checkpoint, the seed and flags it was
trained with (a resumed run replays its seed and refuses flags that would build another
model), and its architecture."""
import os
import random
from typing import Any, Dict, Optional, Sequence, Tuple

from common.ckpt.io import load_checkpoint
from common.errors import UserError


def resolve_resume(resume: Optional[str], output_dir: str) -> Optional[str]:
    """`--resume PATH` as given; `--resume auto` -> the output folder's last checkpoint, or
    None (a fresh start) when there is none yet."""
    if not resume:
        return None
    if resume == "auto":
        last = os.path.join(output_dir, "checkpoint_last.pth.tar")
        return last if os.path.isfile(last) else None
    if not os.path.isfile(resume):
        raise UserError(f"--resume {resume!r} does not exist; pass a checkpoint file or 'auto'")
    return resume


def resumed_args(resume: Optional[str], output_dir: str, method: str) -> Tuple[Optional[str], Dict[str, Any]]:
    """(checkpoint path, the args it was trained with) for `--resume`; (None, {}) for a
    fresh start. Read before any worker starts, so the run's seed and flags can be checked."""
    path = resolve_resume(resume, output_dir)
    if path is None:
        return None, {}
    return path, load_checkpoint(path, expected_method=method, mmap=True).get("args", {})


def run_seed(given: Optional[int], saved: Dict[str, Any]) -> int:
    """The run's one seed: the resumed checkpoint's (so the data order and augmentations
    continue as they were, whatever --seed says), else --seed, else a fresh draw. The
    ranks then agree on it (common.distributed.launch.start_worker), so the launcher cannot split it."""
    stored = saved.get("seed")
    if stored is not None:
        if given is not None and given != stored:
            print(f"=> resuming with the run's own seed {stored}; --seed {given} is ignored", flush=True)
        return int(stored)
    return given if given is not None else random.randrange(2 ** 31)


def check_same_flags(saved: Dict[str, Any], args, flags: Sequence[str], path: str) -> None:
    """A resumed run must build the same model and problem: name the first flag whose
    value differs from the one the checkpoint was trained with."""
    values = vars(args)

    def shown_as(value: Any) -> str:
        # on/off only for real switches: a dict lookup showed --label-fraction 1.0 as "on" (1.0 == True)
        return ("on" if value else "off") if isinstance(value, bool) else str(value)

    for flag in flags:
        key = flag.lstrip("-").replace("-", "_")
        if key in saved and saved[key] != values[key]:
            shown, now = shown_as(saved[key]), shown_as(values[key])
            raise UserError(f"{path!r} was trained with {flag} {shown} but this run has {flag} {now}; "
                            f"pass the same {flag} to resume it (or another --output-dir for a new run)")


def check_arch(ckpt: Dict[str, Any], arch: str, path: str) -> None:
    saved = ckpt.get("arch")
    if saved is not None and saved != arch:
        raise UserError(f"checkpoint {path!r} holds a {saved} but -a/--arch is {arch}; "
                        f"pass -a {saved} or a checkpoint of a {arch}")
