"""Which distillation loss (docs/distill.md): SEED's queue cross-entropy against cosine + a
variance term, each distilling the same MoCo teacher (tests/conftest.py MOCO_LEARN: 2 epochs
on 512 synthetic images, class = hue) into a fresh resnet18 for DISTILL_LEARN's budget, over
seeds; kNN top-1 on conftest.learning_knn's 2,048-image bank against the untrained network
(BatchNorm recalibrated) and the teacher itself.

    OMP_NUM_THREADS=1 .venv/bin/python bench/distill_losses.py --seeds 1 2 3
"""
import argparse
import os
import statistics
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from conftest import MOCO_LEARN, SYNTHETIC, learning_knn, run_main, untrained_knn  # noqa: E402

# the distillation of tests/test_distill.py's learning test: 4 epochs of 8 steps
DISTILL_LEARN = SYNTHETIC + ["--synthetic-size", "512", "-b", "64", "--queue-size", "256", "--lr", "0.4",
                             "--warmup-epochs", "0", "--epochs", "4", "--color-strength", "0.25",
                             "--proj-hidden-dim", "512", "--no-payoff", "-p", "1000", "--knn-every", "0"]


def student_knn(knn, ckpt: str) -> float:
    from common.ckpt.io import load_checkpoint
    from common.ckpt.pretrained import load_backbone
    from common.nets.models import build_backbone
    backbone = build_backbone("resnet18", small_images=False)
    load_backbone(backbone, load_checkpoint(ckpt))
    return knn.evaluate(backbone)["knn_top1"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--losses", nargs="+", default=["seed", "cosine"])
    p.add_argument("--teacher", default=None, help="a MOCO_LEARN checkpoint (default: trained here)")
    a = p.parse_args()
    import main_distill
    import main_moco
    work = tempfile.mkdtemp(prefix="distill_losses_")
    teacher = a.teacher
    if teacher is None:
        assert run_main(main_moco.main, MOCO_LEARN + ["--output-dir", os.path.join(work, "teacher")]) == 0
        teacher = os.path.join(work, "teacher", "checkpoint_last.pth.tar")
    knn = learning_knn(os.path.join(work, "knn"))
    print(f"untrained resnet18: {untrained_knn(knn):.1f}  teacher: {student_knn(knn, teacher):.1f}", flush=True)
    for loss in a.losses:
        tops = []
        for seed in a.seeds:
            out = os.path.join(work, f"{loss}_{seed}")
            argv = DISTILL_LEARN + ["--teacher", teacher, "--distill-loss", loss, "--seed", str(seed),
                                    "--output-dir", out]
            assert run_main(main_distill.main, argv) == 0
            tops.append(student_knn(knn, os.path.join(out, "checkpoint_last.pth.tar")))
            print(f"{loss} seed {seed}: kNN top-1 {tops[-1]:.1f}", flush=True)
        sd = statistics.stdev(tops) if len(tops) > 1 else 0.0
        print(f"{loss}: mean {statistics.mean(tops):.1f} sd {sd:.1f} ({' / '.join(f'{t:.1f}' for t in tops)})",
              flush=True)


if __name__ == "__main__":
    main()
