"""SimCLR: NT-Xent against a loop-over-pairs reference, the distributed loss and gradients
against one process on the whole batch (2 gloo workers), LARS, resume, CLI, checkpoint
layout, and pretraining that beats random init under the same kNN probe."""
import argparse
import json
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from conftest import SYNTHETIC, run_main, run_script

import main_simclr
from common.ckpt.io import load_checkpoint
from common.ckpt.pretrained import load_backbone
from common.distributed.collectives import DistEnv, all_gather_with_grad
from common.eval.monitor import KnnMonitor
from common.nets.models import build_backbone
from common.train.optim import LARS, build_optimizer, scaled_lr, split_decay_groups
from simclr.builder import SimCLR, projection_head
from simclr.loss import nt_xent

TINY = SYNTHETIC + ["--synthetic-size", "64", "-b", "16", "--proj-dim", "16", "--proj-hidden-dim", "32",
                    "--seed", "3", "-p", "2",
                    # step lr (plus a warmup): the lr of epoch 0 does not depend on --epochs
                    "--no-cos", "--schedule", "1", "--warmup-epochs", "0.5", "--no-payoff"]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def run_in_process(argv) -> int:
    return run_main(main_simclr.main, argv)


# ---------------------------------------------------------------- NT-Xent

def nt_xent_reference(z1: torch.Tensor, z2: torch.Tensor, t: float) -> torch.Tensor:
    """The definition, one pair at a time: anchor k's positive is the other view of its
    image, every other embedding but itself is in the denominator."""
    z = [F.normalize(v, dim=0) for v in list(z1) + list(z2)]
    n2 = len(z)
    total = 0.0
    for i in range(n2):
        pos = (i + n2 // 2) % n2
        denom = sum(torch.exp(torch.dot(z[i], z[k]) / t) for k in range(n2) if k != i)
        total = total - torch.log(torch.exp(torch.dot(z[i], z[pos]) / t) / denom)
    return total / n2


@pytest.mark.parametrize("n", [2, 3, 8, 17])
@pytest.mark.parametrize("t", [0.1, 0.5, 1.0])
def test_nt_xent_matches_loop_reference(n, t):
    g = torch.Generator().manual_seed(n * 100 + int(t * 10))
    z1 = torch.randn(n, 12, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(n, 12, generator=g, dtype=torch.float64, requires_grad=True)
    ref = nt_xent_reference(z1, z2, t)
    r1, r2 = torch.autograd.grad(ref, (z1, z2))
    loss, acc1 = nt_xent(z1, z2, t)
    torch.testing.assert_close(loss, ref.float(), rtol=1e-5, atol=1e-6)  # computed in fp32
    g1, g2 = torch.autograd.grad(loss, (z1, z2))
    torch.testing.assert_close(g1, r1, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g2, r2, rtol=1e-4, atol=1e-6)
    # acc1: % of anchors whose positive beats every negative
    z = F.normalize(torch.cat([z1, z2]).detach(), dim=1)
    sim = z @ z.T
    sim.fill_diagonal_(-float("inf"))
    pos = (torch.arange(2 * n) + n) % (2 * n)
    assert acc1.item() == pytest.approx((sim.argmax(1) == pos).double().mean().item() * 100)


def test_nt_xent_identical_views_far_apart_give_the_minimum():
    # views equal and images orthogonal: the positive has similarity 1, negatives 0
    z = torch.eye(4)
    loss, acc1 = nt_xent(z, z.clone(), 0.5)
    expected = -math.log(math.exp(2) / (math.exp(2) + 6))  # e^(1/T) vs 2n-2 = 6 negatives at e^0
    assert loss.item() == pytest.approx(expected, rel=1e-6) and acc1.item() == 100.0


def test_batch_of_one_is_a_clear_error(capsys, tmp_path):
    with pytest.raises(ValueError, match="no negatives"):
        nt_xent(torch.randn(1, 8), torch.randn(1, 8), 0.1)
    assert run_in_process(SYNTHETIC + ["-b", "1", "--epochs", "1", "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "error: --batch-size 1 leaves NT-Xent no negatives" in err and "Traceback" not in err


# ---------------------------------------------------------------- 2 gloo workers == 1 process

class ToyEncoder(nn.Module):
    """A torchvision-shaped model (`fc` head) without BatchNorm: per-process BN statistics
    would differ from the whole batch's, and this test is about the loss and gather."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 24), nn.ReLU())
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        return self.fc(self.body(x))


def toy_simclr(t: float) -> SimCLR:
    return SimCLR(ToyEncoder, proj_dim=8, proj_hidden_dim=16, proj_bn=False, temperature=t)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_worker(rank: int, world: int, url: str, case: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=url, rank=rank, world_size=world)
    try:
        n = case["z1"].shape[0] // world
        sl = slice(rank * n, (rank + 1) * n)
        t = case["t"]

        # the gather: forward is the concatenation, backward the sum of every rank's gradient
        x = torch.full((2, 3), float(rank + 1), requires_grad=True)
        y = all_gather_with_grad(x)
        torch.testing.assert_close(y.detach(), torch.cat([torch.full((2, 3), float(r + 1)) for r in range(world)]))
        (y * torch.arange(1.0, 2 * world + 1).view(-1, 1) * (rank + 1)).sum().backward()
        # rank r' weights row j by (j + 1) * (r' + 1); summed over r': (j + 1) * sum(r' + 1)
        w_sum = sum(r + 1 for r in range(world))
        torch.testing.assert_close(x.grad, torch.arange(2 * rank + 1.0, 2 * rank + 3).view(-1, 1).expand(2, 3) * w_sum)

        # NT-Xent on this rank's rows against the global batch
        z1 = case["z1"][sl].clone().requires_grad_(True)
        z2 = case["z2"][sl].clone().requires_grad_(True)
        loss, acc1 = nt_xent(z1, z2, t)
        loss.backward()
        mean = torch.stack([loss.detach(), acc1]).clone()
        dist.all_reduce(mean)
        mean /= world
        torch.testing.assert_close(mean[0], case["loss"])  # mean of rank losses == full-batch loss
        torch.testing.assert_close(mean[1], case["acc1"])
        # each rank's gradient: of the sum of all rank losses = world x the full-batch loss
        torch.testing.assert_close(z1.grad, world * case["g1"][sl], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(z2.grad, world * case["g2"][sl], rtol=1e-4, atol=1e-6)

        # the model under DDP: DDP's gradient average == one process on the whole batch
        model = toy_simclr(t)
        model.load_state_dict(case["state"])
        ddp = nn.parallel.DistributedDataParallel(model)
        loss, _ = ddp(case["x1"][sl], case["x2"][sl])
        loss.backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, case["param_grads"][name], rtol=1e-4, atol=1e-6, msg=name)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_workers_equal_one_process_on_the_full_batch(tmp_path):
    torch.manual_seed(0)
    t, N = 0.2, 8
    z1 = torch.randn(N, 16, requires_grad=True)
    z2 = torch.randn(N, 16, requires_grad=True)
    loss, acc1 = nt_xent(z1, z2, t)
    loss.backward()
    model = toy_simclr(t)
    x1, x2 = torch.randn(N, 3, 4, 4), torch.randn(N, 3, 4, 4)
    model(x1, x2)[0].backward()
    case = {"t": t, "z1": z1.detach(), "z2": z2.detach(), "loss": loss.detach(), "acc1": acc1,
            "g1": z1.grad, "g2": z2.grad, "x1": x1, "x2": x2,
            "state": {k: v.clone() for k, v in model.state_dict().items()},
            "param_grads": {k: p.grad.clone() for k, p in model.named_parameters()}}
    mp.spawn(_dist_worker, args=(2, f"tcp://127.0.0.1:{_free_port()}", case), nprocs=2, join=True)


# ---------------------------------------------------------------- head, optimizer

def test_projection_head_and_layout():
    head = projection_head(512, 64, 16, layers=3, bn=True)
    linears = [m for m in head if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(512, 64), (64, 64), (64, 16)]
    assert all(m.bias is None for m in linears) and not head[-1].bias.requires_grad
    model = SimCLR(lambda: build_backbone("resnet18"), proj_dim=16)
    # fc is the head, so the backbone is the torchvision model minus fc
    assert model.encoder.fc[0].in_features == 512 and model.encoder.fc[0].out_features == 512
    plain = [m for m in projection_head(512, 64, 16, layers=2, bn=False)]
    assert [type(m) for m in plain] == [nn.Linear, nn.ReLU, nn.Linear]


def test_lars_excludes_bn_and_bias_and_scales_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    groups = split_decay_groups(model)
    assert [p.ndim for p in groups[0]["params"]] == [2] and len(groups[1]["params"]) == 3
    opt = LARS(groups, lr=0.5, momentum=0.9, weight_decay=0.1, eta=0.01)
    w0 = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(5, 4)).pow(2).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    w, g = w0[0], grads[0] + 0.1 * w0[0]
    trust = 0.01 * w.norm() / g.norm()
    torch.testing.assert_close(model[0].weight, w - 0.5 * trust * g)
    for p, p0, g0 in zip(list(model.parameters())[1:], w0[1:], grads[1:]):  # plain SGD step, no decay
        torch.testing.assert_close(p, p0 - 0.5 * g0)
    assert scaled_lr(0.3, 4096, "linear") == pytest.approx(4.8)
    assert scaled_lr(1.2, 4096, "sqrt") == pytest.approx(0.075 * 64)
    args = argparse.Namespace(optimizer="adam", momentum=0.9, weight_decay=0.0, lars_eta=0.001)
    assert isinstance(build_optimizer(model, args, 1e-3), torch.optim.Adam)


def test_lars_multi_tensor_step_equals_the_per_tensor_rule():
    """The foreach LARS against the update written per tensor, over several steps (momentum
    buffers), with a zero weight (trust 1), a tensor without a gradient (untouched) and an
    lr change between steps (applied outside the buffer)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3), nn.Linear(6, 2))
    with torch.no_grad():
        model[2].weight.zero_()
    ref = [p.detach().clone() for p in model.parameters()]
    decayed = [p.ndim > 1 for p in model.parameters()]
    bufs = [None] * len(ref)
    opt = LARS(split_decay_groups(model), lr=0.5, momentum=0.9, weight_decay=0.1, eta=0.01)
    for step, lr in enumerate([0.5, 0.5, 0.2]):
        opt.param_groups[0]["lr"] = opt.param_groups[1]["lr"] = lr
        opt.zero_grad(set_to_none=True)
        x = torch.randn(8, 6)
        model[2](model[1](model[0](x))).pow(2).sum().backward()  # model[3] gets no gradient
        grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
        opt.step()
        for i, g in enumerate(grads):
            if g is None:
                continue
            if decayed[i]:
                g = g + 0.1 * ref[i]
                wn, gn = ref[i].norm(), g.norm()
                g = g * (0.01 * wn / gn if wn > 0 and gn > 0 else 1.0)
            bufs[i] = g.clone() if bufs[i] is None else 0.9 * bufs[i] + g
            ref[i] = ref[i] - lr * bufs[i]
        for p, r in zip(model.parameters(), ref):
            torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-7)
    assert model[3].weight.grad is None and len(opt.state) == 6


# ---------------------------------------------------------------- the script

def test_help(capsys):
    assert run_in_process(["--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--temperature", "--proj-dim", "--proj-layers", "--optimizer", "--lr-scaling", "--color-strength",
                 "--sync-bn", "--knn-every", "--resume", "--amp", "--channels-last", "--multiprocessing-distributed"):
        assert flag in out, flag


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory):
    """main_simclr.py for 1 epoch (LARS, step lr with warmup): the first half of the resume test."""
    out = tmp_path_factory.mktemp("simclr_one_epoch")
    proc = run_script("main_simclr.py", TINY + ["--epochs", "1", "--output-dir", str(out)])
    return out, proc


@pytest.mark.slow
def test_one_epoch_run_writes_checkpoint_metrics_and_loads_as_backbone(one_epoch_run):
    out, proc = one_epoch_run
    assert "img/s" in proc.stdout and "eta" in proc.stdout and "lars lr 0.01875" in proc.stdout
    ckpt = load(out / "checkpoint_last.pth.tar")  # weights_only=True: no pickled classes
    assert ckpt["method"] == "simclr" and ckpt["epoch"] == 1 and ckpt["arch"] == "resnet18"
    sd = ckpt["state_dict"]
    assert "module.encoder.conv1.weight" in sd and "module.encoder.fc.0.weight" in sd
    assert os.path.isfile(out / "checkpoint_0001.pth.tar")
    rec = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert rec[0]["epoch"] == 0 and rec[0]["loss"] > 0 and 0 <= rec[0]["acc1"] <= 100 and "images_per_sec" in rec[0]

    backbone = build_backbone("resnet18", small_images=False)
    layout = load_backbone(backbone, load_checkpoint(str(out / "checkpoint_last.pth.tar")))
    assert layout == "module.encoder"
    assert torch.equal(backbone.layer4[1].conv2.weight, sd["module.encoder.layer4.1.conv2.weight"])


@pytest.mark.slow
def test_resume_equals_uninterrupted_run(capsys, tmp_path):
    # in-process (the fixture's subprocess may differ in CPU threads, hence in the last bits)
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_in_process(TINY + ["--epochs", "2", "--output-dir", str(straight)]) == 0
    assert run_in_process(TINY + ["--epochs", "1", "--output-dir", str(split)]) == 0
    assert run_in_process(TINY + ["--epochs", "2", "--output-dir", str(split), "--resume", "auto"]) == 0
    assert "resumed from" in capsys.readouterr().out
    a, b = load(straight / "checkpoint_last.pth.tar"), load(split / "checkpoint_last.pth.tar")
    assert a["epoch"] == b["epoch"] == 2
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    # LARS momentum buffers too
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])


@pytest.mark.parametrize("args, message", [
    (["--temperature", "0"], "--temperature 0.0 must be positive"),
    (["--resume", "/nonexistent.pth.tar"], "does not exist"),
    (["--sync-bn", "--cpu", "--multiprocessing-distributed", "--nproc-per-node", "2",
      "--dist-url", "tcp://127.0.0.1:29533"], "--sync-bn needs GPUs"),
])
def test_bad_input_gives_one_sentence(args, message, tmp_path, capsys):
    assert run_in_process(TINY + args + ["--epochs", "1", "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


# ---------------------------------------------------------------- learning

# 128 steps of batch 32 (~25 s of CPU). Class = hue in the synthetic data, so the colour
# distortion is mild (s = 0.25: hue jitter +-0.05, classes 0.125 apart) and crops keep 30 %
# of the image. lr 0.03 with a warmup: at lr 0.1, 48-128 steps ended anywhere from 10 below
# to 18 above random init depending on the seed.
LEARN = SYNTHETIC + ["--synthetic-size", "512", "-b", "32", "--epochs", "3", "--seed", "1", "-p", "1000",
                     "--optimizer", "sgd", "--lr", "0.03", "--lr-scaling", "none", "--wd", "5e-4",
                     "--warmup-epochs", "0.5", "--temperature", "0.2", "--color-strength", "0.25", "--crop-min", "0.3",
                     "--knn-every", "3", "--no-payoff"]  # (its own kNN comparison; the payoff: test_payoff.py)


@pytest.mark.long
@pytest.mark.slow
def test_pretraining_beats_the_untrained_network_under_the_same_knn(tmp_path):
    """48 steps (512 images, 3 epochs). Measured over seeds 1-6 (2 CPU cores, torch 2.14.1) on
    the learning tests' kNN set (conftest.learning_knn: 2,048-image bank, 512 val): kNN top-1
    83.2 / 90.6 / 85.9 / 90.0 / 82.6 / 86.1 (mean 86.4, sd 3.3) against 65.6 for the untrained
    control (BatchNorm statistics from the data); margin 8, the smallest gap 17.0, the mean gap
    3.9 sd above the margin. 32 steps (2 epochs) were weaker and wider (mean 81.6, sd 4.6, the
    smallest gap 10.5); 128 steps (1,024 images, 4 epochs) cost twice as much for 84.6 +- 3.8."""
    from conftest import learning_knn, untrained_knn
    argv = LEARN + ["--output-dir", str(tmp_path)]
    assert run_in_process(argv) == 0
    logged = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")][-1]
    args = main_simclr.finalize_args(main_simclr.get_args_parser().parse_args(argv + ["--resume", "auto"]))
    monitor = KnnMonitor(args, DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"),
                                       distributed=False))
    pretrained = build_backbone("resnet18", small_images=False)
    load_backbone(pretrained, load_checkpoint(str(tmp_path / "checkpoint_last.pth.tar")))
    # the checkpoint holds the backbone the run's own monitor evaluated
    assert monitor.evaluate(pretrained)["knn_top1"] == pytest.approx(logged["knn_top1"], abs=1.0)
    assert logged["not_learning"] is False  # a run that learns is not flagged (common/watch/collapse.py)
    knn = learning_knn(tmp_path / "knn")
    learned, control = knn.evaluate(pretrained)["knn_top1"], untrained_knn(knn)
    print(f"kNN top-1: SimCLR {learned:.2f}, untrained {control:.2f}")
    assert learned > control + 8.0
