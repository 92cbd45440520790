"""Small-data guard rails: the queue and momentum warnings, the cosine key momentum (and
that the step loop applies it per step), and the collapse message."""
import argparse
import contextlib
import io
import math

import pytest
import torch
from conftest import SYNTHETIC, run_inline
from test_moco_builder import tiny_moco

from common.augment.gpu import ViewsToDevice
from common.distributed.collectives import DistEnv
from common.train.data import PretrainData
from common.train.schedule import cosine_momentum
from common.train.step import train_one_epoch
from common.watch.collapse import CollapseWatch
from moco.small_data import init_share_at_end, momentum_warning, queue_warning


def test_cosine_momentum_rises_from_the_base_to_one():
    assert cosine_momentum(0.99, 0, 10) == pytest.approx(0.99)
    assert cosine_momentum(0.99, 5, 10) == pytest.approx(0.995)
    assert cosine_momentum(0.99, 10, 10) == pytest.approx(1.0)
    values = [cosine_momentum(0.9, e / 4, 8) for e in range(33)]
    assert values == sorted(values)


def test_init_share_is_the_product_of_the_momenta():
    assert init_share_at_end(0.999, 216) == pytest.approx(0.999 ** 216)
    steps = 50
    product = math.prod(cosine_momentum(0.9, s / steps, 1) for s in range(steps))
    assert init_share_at_end(0.9, steps, cosine=True) == pytest.approx(product)
    assert init_share_at_end(0.9, steps, cosine=True) > init_share_at_end(0.9, steps)  # slower on average


def test_queue_warning_names_the_k_that_fits():
    # the case: 1,024 keys over 1,736 images (59 %), 64 keys per step
    message = queue_warning(1024, 1736, 64)
    assert "59%" in message and "--moco-k 128 or less" in message
    assert queue_warning(128, 1736, 64) is None
    assert queue_warning(65536, 1_281_167, 256) is None  # ImageNet's recipe is fine
    # one step's keys are already over a tenth: the advice is a smaller batch, not a K it cannot have
    assert "lower --batch-size until --moco-k 30 or less is a multiple of it" in queue_warning(256, 300, 64)
    assert "use --moco-k" not in queue_warning(64, 128, 64)


def test_momentum_warning_for_a_short_run_suggests_a_faster_momentum():
    message = momentum_warning(0.999, 216)  # the 8 epochs x 27 steps
    assert "81%" in message and "--moco-m 0.98 or lower" in message
    assert init_share_at_end(0.98, 216) <= 0.1 < init_share_at_end(0.99, 216)
    assert momentum_warning(0.99, 216) is None
    assert momentum_warning(0.999, 200 * 5005) is None  # ImageNet, 200 epochs
    assert "--moco-m-cos" in momentum_warning(0.996, 216, cosine=True)


def test_momentum_warning_under_init_names_the_init_weights_not_a_random_draw():
    assert "81% of its random initialisation after" in momentum_warning(0.999, 216)
    message = momentum_warning(0.999, 216, from_init=True)  # --init: both encoders start from the file
    assert "81% of its initial (--init) weights after" in message and "random" not in message


def test_collapse_watch_speaks_once_the_accuracy_fell_after_rising():
    watch = CollapseWatch("lower --moco-k")
    assert watch.update(0, 30.0) is None and watch.update(1, 94.0) is None
    assert watch.update(2, 60.0) is None  # lower, not collapsed
    message = watch.update(3, 21.0)
    assert "from 94.0% (epoch 1) to 21.0%" in message and message.endswith("lower --moco-k")
    early = CollapseWatch("x")
    assert early.update(0, 20.0) is None and early.update(1, 5.0) is None  # it had never risen


@pytest.mark.slow
def test_the_step_loop_sets_the_cosine_momentum_before_every_step():
    model = tiny_moco(K=16, dim=8, m=0.9)
    batches = [([torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)], torch.zeros(8)) for _ in range(4)]
    data = PretrainData(None, batches, None, 8, 4, ViewsToDevice(torch.device("cpu")))
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], 0.01)
    args = argparse.Namespace(amp=False, amp_dtype="bf16", channels_last=False, print_freq=100, epochs=2)
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), distributed=False)
    seen, used = [], []
    update = model.momentum_update_key_encoder

    def momentum_update():  # the momentum each step's update really uses
        used.append(model.m)
        update()

    model.momentum_update_key_encoder = momentum_update

    def key_momentum(progress):
        seen.append(progress)
        model.m = cosine_momentum(0.9, progress, 2)

    with contextlib.redirect_stdout(io.StringIO()):
        train_one_epoch(model, data, optimizer, torch.amp.GradScaler("cpu", enabled=False), lambda _: 0.01, 1, args,
                        env, per_step=key_momentum)
    assert seen == [1.0, 1.25, 1.5, 1.75]
    assert used == pytest.approx([cosine_momentum(0.9, p, 2) for p in seen])


@pytest.mark.slow
def test_main_moco_warns_about_queue_and_momentum_and_takes_moco_m_cos(tmp_path, capsys):
    import main_moco
    # 64 images, K 32 (half the dataset), 4 steps at momentum 0.999
    proc = run_inline(capsys, main_moco.main, SYNTHETIC + ["--synthetic-size", "64", "-b", "16", "--moco-k", "32",
                                                   "--moco-dim", "16", "--bn-splits", "2", "--epochs", "1",
                                                   "--moco-m-cos", "--no-payoff", "--output-dir", str(tmp_path)])
    assert "warning: the queue (--moco-k 32) holds 50% of the 64 images" in proc.stdout
    assert "warning: with --moco-m 0.999 and --moco-m-cos the key encoder still holds" in proc.stdout
    ckpt = torch.load(tmp_path / "checkpoint_last.pth.tar", weights_only=True)
    assert ckpt["args"]["moco_m_cos"] is True
