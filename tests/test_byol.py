"""main_byol.py and byol/: the losses against the papers' formulas, BYOL's target as the EMA of
the online network, SimSiam's stop-gradient, the collapse watch (StdWatch) on a collapsing and
a healthy run, resume (epoch end and SIGUSR1 mid-epoch), the checkpoint in main_lincls.py, and
DDP's gradient average against one process."""
import dataclasses
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from conftest import CHILD_WAIT_S, ROOT, SYNTHETIC, assert_same_weights, clean_env, run_inline, run_main
from test_simclr import ToyEncoder, _free_port  # a torchvision-shaped model without BatchNorm

import main_byol
import main_lincls
import main_moco_v3
from byol.builder import BYOL
from byol.loss import effective_rank, negative_cosine, regression_loss, std_of_l2_normalized, symmetric_loss
from common.augment.transforms import Recipe, two_views
from common.ckpt.io import load_checkpoint
from common.eval.metrics import retrieval_acc1
from common.ckpt.pretrained import extract_backbone, load_backbone
from common.nets.models import build_backbone
from common.train.preempt import REQUEUE_EXIT_CODE
from common.train.run import NOT_LEARNING_EXIT, PretrainRun
from common.watch.collapse import RANK_FLOOR, RANK_MIN_WIDTH, STD_FLOOR, StdWatch

# 4 steps an epoch; SGD at a rate that moves a 4-step run (the papers' LARS with 10 warmup epochs would not)
TINY = SYNTHETIC + ["--synthetic-size", "64", "-b", "16", "--proj-dim", "16", "--proj-hidden-dim", "32",
                    "--pred-hidden-dim", "32", "--seed", "3", "-p", "2", "--no-payoff", "--optimizer", "sgd",
                    "--lr", "0.8", "--wd", "1e-4", "--warmup-epochs", "0"]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def tiny_byol(simsiam: bool = False, stop_grad: bool = True) -> BYOL:
    return BYOL(lambda: build_backbone("resnet18", small_images=True), dim=16, hidden_dim=32, pred_dim=8, m=0.9,
                simsiam=simsiam, stop_grad=stop_grad)


# ---------------------------------------------------------------- the math

def test_losses_are_the_papers_formulas_and_symmetric():
    torch.manual_seed(0)
    p1, p2, z1, z2 = (torch.randn(8, 16) for _ in range(4))
    mse = ((F.normalize(p1, dim=1) - F.normalize(z2, dim=1)) ** 2).sum(1).mean()  # BYOL eq. 2
    torch.testing.assert_close(regression_loss(p1, z2), mse)
    cos = (F.normalize(p1, dim=1) * F.normalize(z2, dim=1)).sum(1)
    torch.testing.assert_close(negative_cosine(p1, z2), -cos.mean())
    byol, acc = symmetric_loss(p1, p2, z1, z2, simsiam=False)
    assert byol.shape == () and 0 <= acc <= 100
    torch.testing.assert_close(byol, regression_loss(p1, z2) + regression_loss(p2, z1))
    torch.testing.assert_close(byol, symmetric_loss(p2, p1, z2, z1, simsiam=False)[0])  # the views swapped
    simsiam = symmetric_loss(p1, p2, z1, z2, simsiam=True)[0]
    torch.testing.assert_close(simsiam, (negative_cosine(p1, z2) + negative_cosine(p2, z1)) / 2)
    assert regression_loss(z1, 3 * z1).item() == pytest.approx(0.0, abs=1e-6)  # scale-free
    assert retrieval_acc1(z1, z1 + 1e-3).item() == 100.0


def test_std_is_zero_for_a_collapsed_output_and_near_one_over_sqrt_d_for_a_spread_one():
    torch.manual_seed(0)
    assert std_of_l2_normalized(torch.ones(64, 32) + 1e-6 * torch.randn(64, 32)).item() < 1e-4
    spread = std_of_l2_normalized(torch.randn(4096, 32)).item()
    assert spread == pytest.approx(32 ** -0.5, rel=0.05)


def test_target_is_the_ema_of_the_online_network_after_a_step():
    torch.manual_seed(0)
    model = tiny_byol()
    assert all(not p.requires_grad for p in model.target_encoder.parameters())
    for o, t in zip(model.encoder.parameters(), model.target_encoder.parameters()):
        assert torch.equal(o, t)  # xi starts as theta
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x1, x2 = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)
    model(x1, x2)[0].backward()
    opt.step()  # theta moves, xi not yet
    before = [t.clone() for t in model.target_encoder.parameters()]
    assert not all(torch.equal(o, t) for o, t in zip(model.encoder.parameters(), before))
    loss, stats = model(x1, x2)  # the next step's targets come from xi <- m xi + (1 - m) theta
    for old, o, t in zip(before, model.encoder.parameters(), model.target_encoder.parameters()):
        torch.testing.assert_close(t, 0.9 * old + 0.1 * o)
    with torch.no_grad():
        p1, p2 = model.predictor(model.encoder(x1)), model.predictor(model.encoder(x2))
        t1, t2 = model.target_encoder(x1), model.target_encoder(x2)
    torch.testing.assert_close(loss, regression_loss(p1, t2) + regression_loss(p2, t1))
    assert set(stats) == {"acc1", "std", "rank"}
    keys = {k.split(".")[0] for k in model.state_dict()}
    assert keys == {"encoder", "predictor", "target_encoder"}


def test_simsiam_has_no_target_copy_and_no_gradient_through_the_target_branch():
    torch.manual_seed(0)
    model = tiny_byol(simsiam=True)
    assert not hasattr(model, "target_encoder") and len(model.networks()) == 2
    assert isinstance(model.encoder.fc[-1], nn.BatchNorm1d) and not model.encoder.fc[-1].affine
    x1, x2 = torch.randn(8, 3, 32, 32), torch.randn(8, 3, 32, 32)

    def grads(stop: bool):
        model.zero_grad()
        z1, z2 = model.encoder(x1), model.encoder(x2)
        t1, t2 = (z1.detach(), z2.detach()) if stop else (z1, z2)
        symmetric_loss(model.predictor(z1), model.predictor(z2), t1, t2, simsiam=True)[0].backward()
        return model.encoder.conv1.weight.grad.clone()

    model.zero_grad()
    model(x1, x2)[0].backward()  # (train-mode BN: the same batch gives the same outputs again)
    own = model.encoder.conv1.weight.grad.clone()
    torch.testing.assert_close(own, grads(stop=True))  # only the predictions' branch carries gradient
    assert not torch.allclose(own, grads(stop=False))


# ---------------------------------------------------------------- the collapse watch

def test_std_watch_speaks_below_the_floor_once_per_collapse_and_per_epoch():
    watch = StdWatch(64, "a lower --lr", batch=32)
    healthy, collapsed = 0.9 / 8, 0.5 * STD_FLOOR / 8
    assert watch.step(healthy, 10.0) is None
    message = watch.step(collapsed, 10.0)
    assert "collapsed" in message and "0.1250 (1/sqrt(64))" in message and "try a lower --lr" in message
    assert watch.step(collapsed, 10.0) is None  # told once
    assert watch.update(0, healthy, 10.0) is None and watch.stuck_epochs == 0  # the epoch: averages over the ranks
    assert watch.update(1, collapsed, 10.0) and watch.update(2, collapsed, 10.0) and watch.stuck_epochs == 2
    assert watch.step(healthy, 10.0) is None and watch.update(3, healthy, 10.0) is None and watch.stuck_epochs == 0
    assert watch.step(collapsed, 10.0)  # told again after a recovery


def test_the_rank_sees_the_line_collapse_a_last_batchnorm_hides_from_the_std():
    """Every image +v or -v, through SimSiam's last BN (no affine): the std stays near 1/sqrt(d),
    the effective rank is 1; the watch speaks on the rank where asked (SimSiam), not below
    RANK_MIN_WIDTH images."""
    torch.manual_seed(0)
    line = torch.sign(torch.randn(64, 1)) * torch.randn(1, 32) + 0.01 * torch.randn(64, 32)
    z = nn.BatchNorm1d(32, affine=False)(line)
    assert std_of_l2_normalized(z).item() > 0.7 * 32 ** -0.5 and effective_rank(z).item() < 1.1
    spread = torch.randn(64, 32)
    assert effective_rank(spread).item() > 15 and effective_rank(spread + 5).item() > 15  # centred: a mean is no rank
    watch = StdWatch(32, "x", batch=64, judge_rank=True)
    message = watch.step(std_of_l2_normalized(z).item(), effective_rank(z).item())
    assert "effective rank" in message and "one direction" in message
    assert watch.update(0, 0.9 / 32 ** 0.5, RANK_FLOOR - 0.1) and watch.stuck_epochs == 1
    assert watch.update(1, 0.9 / 32 ** 0.5, RANK_FLOOR + 0.1) is None and watch.stuck_epochs == 0
    assert StdWatch(32, "x", batch=RANK_MIN_WIDTH - 1, judge_rank=True).update(0, 0.9 / 32 ** 0.5, 1.0) is None
    assert StdWatch(32, "x", batch=64).update(0, 0.9 / 32 ** 0.5, 1.0) is None  # BYOL: the std alone


def run_in_process(argv) -> int:
    return run_main(main_byol.main, argv)


@pytest.fixture
def no_view_check(monkeypatch):
    monkeypatch.setattr(PretrainRun, "check_views", lambda self, recipe: None)  # seconds, unrelated


@pytest.mark.slow
def test_a_collapsing_run_is_told_within_a_tenth_of_its_budget_and_can_stop(tmp_path, capsys, no_view_check):
    """--no-stop-grad (both papers' ablation): the output collapses within a few steps; the
    progress lines warn before a tenth of the 80-step budget is spent, the epoch line and
    metrics.jsonl say not_learning, --stop-if-not-learning stops after two epochs."""
    argv = TINY + ["--no-stop-grad", "--epochs", "20", "-p", "1", "--stop-if-not-learning"]
    proc = run_inline(capsys, main_byol.main, argv + ["--output-dir", str(tmp_path)], check=False)
    assert proc.returncode == NOT_LEARNING_EXIT, proc.stdout[-3000:]
    lines = proc.stdout.splitlines()
    first_warning = next(i for i, line in enumerate(lines) if line.startswith("WARNING: the output std"))
    steps_before = [line for line in lines[:first_warning] if line.startswith("Epoch [")]
    assert len(steps_before) <= 8, steps_before  # a tenth of 20 epochs x 4 steps
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if '"epoch"' in line]
    assert [r["not_learning"] for r in records][-2:] == [True, True] and len(records) <= 3  # stopped at once
    assert records[-1]["std"] < STD_FLOOR / 16 ** 0.5


@pytest.mark.slow
def test_a_healthy_run_is_not_flagged(tmp_path, capsys, no_view_check):
    for extra in ([], ["--simsiam"]):
        out = tmp_path / ("simsiam" if extra else "byol")
        proc = run_inline(capsys, main_byol.main, TINY + extra + ["--epochs", "2", "--output-dir", str(out)])
        assert "WARNING" not in proc.stdout
        records = [json.loads(line) for line in open(out / "metrics.jsonl") if '"epoch"' in line]
        assert [r["not_learning"] for r in records] == [False, False]
        assert all(r["std"] > STD_FLOOR / 16 ** 0.5 for r in records)
        if extra:  # (BYOL's rank is not judged: docs/byol.md)
            assert all(r["rank"] > RANK_FLOOR for r in records)


# SimSiam's collapse test and its control: the rate doubled (lr 0.1 at batch 16) so that the collapse comes early
FAST = ["--simsiam", "--lr", "1.6", "-p", "1"]


@pytest.mark.slow
def test_a_collapsing_simsiam_run_is_told_by_the_rank_within_a_tenth_of_its_budget(tmp_path, capsys, no_view_check):
    """SimSiam --no-stop-grad: its last BatchNorm keeps the std near 1/sqrt(d) while the output
    collapses onto a line; the effective rank tells it before a tenth of the 120-step budget,
    --stop-if-not-learning stops it. The same run with the stop-gradient is not flagged."""
    argv = TINY + FAST + ["--no-stop-grad", "--epochs", "30", "--stop-if-not-learning"]
    proc = run_inline(capsys, main_byol.main, argv + ["--output-dir", str(tmp_path / "collapse")], check=False)
    assert proc.returncode == NOT_LEARNING_EXIT, proc.stdout[-3000:]
    lines = proc.stdout.splitlines()
    first_warning = next(i for i, line in enumerate(lines) if line.startswith("WARNING: the effective rank"))
    steps_before = [line for line in lines[:first_warning] if line.startswith("Epoch [")]
    assert len(steps_before) <= 12, steps_before  # a tenth of 30 epochs x 4 steps
    records = [json.loads(line) for line in open(tmp_path / "collapse" / "metrics.jsonl") if '"epoch"' in line]
    assert [r["not_learning"] for r in records][-2:] == [True, True] and len(records) <= 5
    assert records[-1]["std"] > 0.5 / 16 ** 0.5 and records[-1]["rank"] < RANK_FLOOR  # the std alone is blind
    healthy = run_inline(capsys, main_byol.main, TINY + FAST + ["--epochs", "4", "--output-dir", str(tmp_path / "ok")])
    assert "WARNING" not in healthy.stdout
    records = [json.loads(line) for line in open(tmp_path / "ok" / "metrics.jsonl") if '"epoch"' in line]
    assert not any(r["not_learning"] for r in records) and all(r["rank"] > RANK_FLOOR for r in records)


# ---------------------------------------------------------------- the script

def test_the_collapse_hint_names_what_the_method_has():
    parse = lambda *extra: main_byol.get_args_parser().parse_args(["DATA", *extra])
    assert main_byol.collapse_hint(parse()) == "a lower --lr, or a --byol-m closer to 1"
    assert main_byol.collapse_hint(parse("--simsiam")) == "a lower --lr"  # no target network, no --byol-m
    assert main_byol.collapse_hint(parse("--simsiam", "--no-stop-grad")) == "dropping --no-stop-grad"


def test_bad_flags_are_one_sentence(capsys, tmp_path):
    for extra, message in ((["--byol-m", "1.5"], "--byol-m 1.5 is a momentum"),
                           (["--simsiam", "--byol-m", "0.99"], "SimSiam has no momentum copy"),
                           (["-b", "1"], "needs 2 or more images")):
        proc = run_inline(capsys, main_byol.main, TINY + extra + ["--output-dir", str(tmp_path)], check=False)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr


def test_byol_views_are_the_asymmetric_pair_and_view_1_is_always_blurred(tmp_path):
    """BYOL (and moco-v3): view 1 blurred always and never solarized, view 2 blurred 10 % and
    solarized 20 %; SimSiam: MoCo v2's recipe for both. Checked on the CPU path's own draws:
    view 1 of every sample is smoother than the crop alone, and view 2 is solarized in about a
    fifth of the samples."""
    parse = main_byol.get_args_parser().parse_args
    args = main_byol.finalize_args(parse(["--dataset", "synthetic", "--crop-size", "96",
                                          "--output-dir", str(tmp_path / "b")]))
    first, second = main_byol.view_recipe(args)
    assert (first.blur_p, first.solarize_p, "solarize" in first.ops) == (1.0, 0.0, False)
    assert (second.blur_p, second.solarize_p, "solarize" in second.ops) == (0.1, 0.2, True)
    assert first.jitter == second.jitter == (0.4, 0.4, 0.2, 0.1) and first.crop_min == 0.08
    assert main_moco_v3.view_recipe(main_moco_v3.finalize_args(main_moco_v3.get_args_parser().parse_args(
        ["--dataset", "synthetic", "--crop-size", "96", "--output-dir", str(tmp_path / "m")]))) == (first, second)
    simsiam = main_byol.view_recipe(main_byol.finalize_args(parse(["--dataset", "synthetic", "--simsiam",
                                                                   "--output-dir", str(tmp_path / "s")])))
    assert isinstance(simsiam, Recipe) and "solarize" not in simsiam.ops
    # the CPU path: with the crop and the colour ops off and sigma >= 1.5 (0.1 barely blurs), view 1 is
    # the blurred crop every time
    bare = dict(crop_min=1.0, jitter=(0.0, 0.0, 0.0, 0.0), gray_p=0.0, blur_sigma=(1.5, 2.0))
    pair = tuple(dataclasses.replace(r, **bare) for r in (first, second))
    img = Image.fromarray(((np.indices((96, 96)).sum(0) // 4 % 2) * 255).astype(np.uint8)).convert("RGB")
    sharp = np.abs(np.diff(np.asarray(img, dtype=np.float32), axis=1)).mean()
    solarized = 0
    for seed in range(50):
        torch.manual_seed(seed)
        v1, v2 = two_views(pair)(img)
        assert np.abs(np.diff(v1.numpy(), axis=2)).mean() * 0.229 * 255 < 0.9 * sharp, seed
        solarized += int(v2.max() < 0.5)  # solarized, no pixel is above 127 of 255 (normalised 0.06)
    assert 3 <= solarized <= 20  # p 0.2 of 50


def test_paper_defaults_fill_the_unset_flags(tmp_path):
    parse = main_byol.get_args_parser().parse_args
    byol = main_byol.finalize_args(parse(["--dataset", "synthetic", "--output-dir", str(tmp_path / "b")]))
    assert (byol.optimizer, byol.lr, byol.weight_decay, byol.warmup_epochs, byol.proj_dim, byol.fix_pred_lr) == (
        "lars", 0.2, 1.5e-6, 10.0, 256, False)
    simsiam = main_byol.finalize_args(parse(["--dataset", "synthetic", "--simsiam", "--lr", "0.1",
                                             "--output-dir", str(tmp_path / "s")]))
    assert (simsiam.optimizer, simsiam.lr, simsiam.weight_decay, simsiam.warmup_epochs, simsiam.proj_dim,
            simsiam.pred_hidden_dim, simsiam.fix_pred_lr) == ("sgd", 0.1, 1e-4, 0.0, 2048, 512, True)


@pytest.mark.slow
def test_checkpoint_loads_in_lincls_and_resume_equals_the_uninterrupted_run(tmp_path, capsys, no_view_check):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_in_process(TINY + ["--epochs", "2", "--output-dir", str(straight)]) == 0
    assert run_in_process(TINY + ["--epochs", "2", "--stop-at-epoch", "1", "--output-dir", str(split)]) == 0
    assert run_in_process(TINY + ["--epochs", "2", "--output-dir", str(split), "--resume", "auto"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert_same_weights(straight / "checkpoint_last.pth.tar", split / "checkpoint_last.pth.tar")

    ckpt = load(straight / "checkpoint_last.pth.tar")
    assert ckpt["method"] == "byol" and {k.split(".")[1] for k in ckpt["state_dict"]} == {
        "encoder", "predictor", "target_encoder"}
    weights, layout = extract_backbone(ckpt["state_dict"])
    assert layout == "module.encoder" and not any(k.startswith("fc.") for k in weights)
    backbone = build_backbone("resnet18", small_images=False)
    load_backbone(backbone, load_checkpoint(str(straight / "checkpoint_last.pth.tar")))
    assert torch.equal(backbone.conv1.weight, ckpt["state_dict"]["module.encoder.conv1.weight"])  # the online one
    run_inline(capsys, main_lincls.main, SYNTHETIC + ["--synthetic-size", "64", "-b", "16", "-p", "100",
                                                      "--pretrained", str(straight / "checkpoint_last.pth.tar"),
                                                      "--probe", "logreg", "--output-dir", str(tmp_path / "lincls")])
    # a SimSiam checkpoint is not resumed as BYOL
    proc = run_inline(capsys, main_byol.main, TINY + ["--simsiam", "--epochs", "2", "--resume",
                                                      str(straight / "checkpoint_last.pth.tar"), "--output-dir",
                                                      str(tmp_path / "other")], check=False)
    assert proc.returncode == 2 and "main_byol.py" in proc.stderr


@pytest.mark.long
@pytest.mark.slow
# BYOL only: SimSiam runs the same step loop and checkpoint with one network fewer (no EMA
# target), so BYOL's case covers its state too (20 s of the suite each)
@pytest.mark.parametrize("extra", [[]], ids=["byol"])
def test_sigusr1_mid_epoch_requeues_and_the_resume_reproduces_the_run(tmp_path, extra):
    """SimSiam with --fix-pred-lr (the predictor's lr outside the schedule) and BYOL's momentum
    both come back exactly after a preemption in the middle of an epoch."""
    script = os.path.join(ROOT, "main_byol.py")
    argv = TINY + extra + ["--epochs", "2", "-p", "1"]
    straight = tmp_path / f"straight{len(extra)}"
    subprocess.run([sys.executable, script] + argv + ["--output-dir", str(straight)], cwd=ROOT, env=clean_env(),
                   check=True, capture_output=True, timeout=CHILD_WAIT_S)
    out = tmp_path / f"stopped{len(extra)}"
    argv += ["--output-dir", str(out), "--resume", "auto"]
    env = clean_env(SLURM_JOB_ID=4242, PATH="/nonexistent")
    proc = subprocess.Popen([sys.executable, script] + argv, cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        for line in proc.stdout:
            if "Epoch [1/2][1/4]" in line:
                proc.send_signal(signal.SIGUSR1)
                break
        proc.stdout.read()
        assert proc.wait(timeout=CHILD_WAIT_S) == REQUEUE_EXIT_CODE
    finally:
        if proc.poll() is None:
            proc.kill()
    mid = load(out / "checkpoint_last.pth.tar")
    assert mid["epoch"] == 1 and 1 <= mid["iteration"] < 4
    resumed = subprocess.run([sys.executable, script] + argv, cwd=ROOT, env=env, capture_output=True, text=True,
                             timeout=CHILD_WAIT_S)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_weights(straight / "checkpoint_last.pth.tar", out / "checkpoint_last.pth.tar")


# ---------------------------------------------------------------- 2 gloo workers == 1 process

def toy_byol() -> BYOL:
    """BYOL on test_simclr's ToyEncoder, its MLPs without BN: per-process BN statistics would differ
    from the whole batch's, and this test is about the loss and DDP's average."""
    model = BYOL(ToyEncoder, dim=8, hidden_dim=16, pred_dim=16, m=0.9)
    for mlp in (model.encoder.fc, model.target_encoder.fc, model.predictor):  # no BN (see ToyEncoder)
        for i, m in enumerate(mlp):
            if isinstance(m, nn.BatchNorm1d):
                mlp[i] = nn.Identity()
    return model


def _dist_worker(rank: int, world: int, url: str, case: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=url, rank=rank, world_size=world)
    try:
        n = case["x1"].shape[0] // world
        sl = slice(rank * n, (rank + 1) * n)
        model = toy_byol()
        model.load_state_dict(case["state"])
        ddp = nn.parallel.DistributedDataParallel(model)
        ddp(case["x1"][sl], case["x2"][sl])[0].backward()
        for name, p in model.named_parameters():
            if p.requires_grad:  # DDP's average of the rank losses' gradients == the whole batch's
                torch.testing.assert_close(p.grad, case["grads"][name], rtol=1e-4, atol=1e-6, msg=name)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_workers_equal_one_process_on_the_full_batch():
    torch.manual_seed(0)
    model = toy_byol()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x1, x2 = torch.randn(8, 3, 4, 4), torch.randn(8, 3, 4, 4)
    model(x1, x2)[0].backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    mp.spawn(_dist_worker, args=(2, f"tcp://127.0.0.1:{_free_port()}", {"x1": x1, "x2": x2, "state": state,
                                                                         "grads": grads}), nprocs=2, join=True)
