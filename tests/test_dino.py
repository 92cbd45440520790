"""main_dino.py and dino/: DINOLoss (centring, the teacher temperature schedule, no crop is its
own target), the teacher as the EMA of the student after the step and without gradient, the
last layer frozen in the first epochs, the weight-normed head, multi-crop shapes (the teacher
sees the global crops only), resume (epoch end and SIGUSR1 mid-epoch), and checkpoints in
facebookresearch/dino's layout both ways (theirs in main_lincls/main_knn/export/--init, ours
under DINO's eval_linear loading rule)."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import torchvision.models as tvm
from PIL import Image
from conftest import (CHILD_WAIT_S, ROOT, SYNTHETIC, assert_same_weights, clean_env, run_inline, run_main,
                      wait_for_line)
from test_simclr import ToyEncoder, _free_port

import main_dino
import main_knn
import main_lincls
from common.ckpt.io import load_checkpoint
from common.ckpt.pretrained import extract_backbone, load_backbone
from common.ckpt.vit_keys import torchvision_to_timm
from common.nets.models import build_backbone
from common.train.preempt import REQUEUE_EXIT_CODE
from common.train.run import NOT_LEARNING_EXIT, PretrainRun
from dino.augment import dino_views, local_crop_size
from dino.builder import DINO
from dino.head import DINOHead
from dino.loss import DINOLoss, teacher_temp_schedule
from dino.schedule import clip_gradients, lr_at, weight_decay_at
from common.watch.entropy import EntropyWatch

# 4 steps an epoch, 2 global + 2 local crops, a small head; SGD at a rate that moves 4 steps
TINY = SYNTHETIC + ["--synthetic-size", "64", "-b", "16", "--out-dim", "32", "--local-crops-number", "2",
                    "--seed", "3", "-p", "2", "--no-payoff", "--optimizer", "sgd", "--lr", "0.5", "--wd", "1e-4",
                    "--warmup-epochs", "0", "--momentum-teacher", "0.9"]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture
def no_view_check(monkeypatch):
    monkeypatch.setattr(PretrainRun, "check_views", lambda self, recipe: None)  # seconds, unrelated


def toy_dino(n_local: int = 2, **kw) -> DINO:
    return DINO(ToyEncoder, out_dim=16, n_local_crops=n_local, hidden_dim=32, bottleneck_dim=8, **kw)


# ---------------------------------------------------------------- the math

def test_teacher_temperature_schedule_is_linear_then_flat():
    np.testing.assert_allclose(teacher_temp_schedule(0.04, 0.07, 3, 5), [0.04, 0.055, 0.07, 0.07, 0.07])
    loss = DINOLoss(8, 4, 0.04, 0.07, 30, 100)
    assert loss.teacher_temp(0) == pytest.approx(0.04) and loss.teacher_temp(29) == pytest.approx(0.07)
    assert loss.teacher_temp(99) == pytest.approx(0.07) and loss.teacher_temp(150) == pytest.approx(0.07)
    assert DINOLoss(8, 4, 0.04, 0.04, 0, 3).teacher_temp(0) == pytest.approx(0.04)


def test_loss_is_the_cross_entropy_over_pairs_of_other_crops_and_the_centre_moves_exactly():
    torch.manual_seed(0)
    b, k, n = 3, 6, 4  # 2 global + 2 local crops
    loss_fn = DINOLoss(k, n, 0.04, 0.07, 2, 10, center_momentum=0.9)
    loss_fn.center.copy_(torch.randn(1, k))
    center0 = loss_fn.center.clone()
    student, teacher = torch.randn(n * b, k), torch.randn(2 * b, k)
    loss, stats = loss_fn(student, teacher, epoch=1)  # teacher temperature 0.07
    q = F.softmax((teacher - center0) / 0.07, dim=-1).chunk(2)
    s = F.log_softmax(student / 0.1, dim=-1).chunk(n)
    pairs = [(t, v) for t in range(2) for v in range(n) if v != t]
    assert len(pairs) == 2 * (n - 1)
    expected = sum((-q[t] * s[v]).sum(-1).mean() for t, v in pairs) / len(pairs)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(loss_fn.center, 0.9 * center0 + 0.1 * teacher.mean(0, keepdim=True))
    assert set(stats) == {"teacher_entropy", "batch_entropy", "kl"}
    kl = sum((torch.special.xlogy(q[t], q[t]) - q[t] * s[v]).sum(-1).mean() for t, v in pairs) / len(pairs)
    torch.testing.assert_close(stats["kl"], kl)
    # global crop 0 is never its own target: its student rows take their gradient from teacher crop 1 only
    grads = []
    for t0 in (teacher[:b], 5 * torch.randn(b, k)):
        st = student.clone().requires_grad_()
        DINOLoss(k, n, 0.04, 0.07, 2, 10)(st, torch.cat([t0, teacher[b:]]), epoch=1)[0].backward()
        grads.append(st.grad[:b])
    torch.testing.assert_close(grads[0], grads[1])


def test_schedules_and_clipping_are_dinos():
    assert lr_at(0.0, 1.0, 0.01, 10, 2) == 0 and lr_at(1.0, 1.0, 0.01, 10, 2) == pytest.approx(0.5)
    assert lr_at(2.0, 1.0, 0.01, 10, 2) == pytest.approx(1.0) and lr_at(10.0, 1.0, 0.01, 10, 2) == pytest.approx(0.01)
    assert weight_decay_at(0, 0.04, 0.4, 10) == pytest.approx(0.04) and weight_decay_at(10, 0.04, 0.4, 10) == 0.4
    assert weight_decay_at(5, 0.04, 0.4, 10) == pytest.approx(0.22)
    big, small = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
    big.grad, small.grad = torch.tensor([3.0, 4.0, 0.0]), torch.tensor([0.3, 0.4])
    clip_gradients([big, small], 1.0)  # each tensor on its own: 5 -> 1, 0.5 kept
    torch.testing.assert_close(big.grad, torch.tensor([0.6, 0.8, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(small.grad, torch.tensor([0.3, 0.4]))


def test_head_is_weight_normed_with_fixed_norms_and_dinos_keys():
    head = DINOHead(24, 16, hidden_dim=32, bottleneck_dim=8)
    assert not head.last_layer.weight_g.requires_grad and torch.equal(head.last_layer.weight_g, torch.ones(16, 1))
    keys = set(head.state_dict())
    assert {"last_layer.weight_g", "last_layer.weight_v", "mlp.0.weight", "mlp.4.bias"} <= keys
    out = head(torch.randn(5, 24))
    assert out.shape == (5, 16)
    head.last_layer.weight_v.data.mul_(7)  # the effective prototypes keep norm g = 1 whatever v's
    head(torch.randn(1, 24))
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(16))
    assert DINOHead(24, 16, norm_last_layer=False).last_layer.weight_g.requires_grad
    assert any(isinstance(m, nn.BatchNorm1d) for m in DINOHead(24, 16, use_bn=True).mlp)


def test_teacher_is_the_ema_of_the_student_after_a_step_and_gets_no_gradient():
    torch.manual_seed(0)
    model = toy_dino()
    for s, t in zip(model.student.state_dict().values(), model.teacher.state_dict().values()):
        assert torch.equal(s, t)  # the teacher starts as the student
    assert all(not p.requires_grad for p in model.teacher.parameters())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    crops = [torch.randn(4, 3, 4, 4) for _ in range(4)]
    loss, _ = model(*crops)
    loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    opt.step()
    before = [t.clone() for t in model.teacher.parameters()]
    model.m = 0.9
    model.update_teacher()
    for old, s, t in zip(before, model.student.parameters(), model.teacher.parameters()):
        torch.testing.assert_close(t, 0.9 * old + 0.1 * s)
    assert {k.split(".")[0] for k in model.state_dict()} == {"student", "teacher", "loss"}


def test_multi_crop_shapes_and_the_teacher_sees_only_the_global_crops():
    views = dino_views(32, local_crop_size(32), 3, (0.4, 1.0), (0.05, 0.4), blur=False)
    assert local_crop_size(224) == 96 and local_crop_size(32) == 16
    crops = [v(Image.new("RGB", (40, 40), (200, 30, 90))) for v in views]
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert "solarize" in views[1].ops and "solarize" not in views[0].ops + views[2].ops
    model = DINO(lambda: build_backbone("resnet18", small_images=True), out_dim=16, n_local_crops=3, hidden_dim=32,
                 bottleneck_dim=8)
    seen = {"student": [], "teacher": []}
    for name in seen:
        getattr(model, name).backbone.register_forward_hook(lambda m, i, o, n=name: seen[n].append(tuple(i[0].shape)))
    b = 2
    batch = [torch.randn(b, 3, 32, 32) for _ in range(2)] + [torch.randn(b, 3, 16, 16) for _ in range(3)]
    out = model.student(batch)
    assert out.shape == (5 * b, 16)  # (n_crops*B) x out_dim
    model(*batch)
    assert seen["teacher"] == [(2 * b, 3, 32, 32)]  # the global crops, in one batch
    assert seen["student"][-2:] == [(2 * b, 3, 32, 32), (3 * b, 3, 16, 16)]


# ---------------------------------------------------------------- 2 gloo workers == 1 process

def _dist_worker(rank: int, world: int, url: str, case: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=url, rank=rank, world_size=world)
    try:
        n = case["crops"][0].shape[0] // world
        model = toy_dino()  # ToyEncoder and a head without BN: per-process BN statistics would differ
        model.load_state_dict(case["state"])
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        ddp(*[c[rank * n:(rank + 1) * n] for c in case["crops"]])[0].backward()
        opt.step()
        model.m = 0.9
        model.update_teacher()
        # the centre is all-reduced: half batches on 2 processes give the whole batch's centre
        torch.testing.assert_close(model.loss.center, case["center"], rtol=1e-5, atol=1e-6)
        for name, t in model.teacher.state_dict().items():
            torch.testing.assert_close(t, case["teacher"][name], rtol=1e-4, atol=1e-6, msg=name)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_workers_give_the_centre_and_teacher_of_one_process_on_the_whole_batch():
    torch.manual_seed(0)
    model = toy_dino()
    model.loss.center.copy_(torch.randn(1, 16))  # a centre that has moved: its momentum is checked too
    state = {k: v.clone() for k, v in model.state_dict().items()}
    crops = [torch.randn(8, 3, 4, 4) for _ in range(4)]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model(*crops)[0].backward()
    opt.step()
    model.m = 0.9
    model.update_teacher()
    assert not torch.equal(model.loss.center, state["loss.center"])
    case = {"crops": crops, "state": state, "center": model.loss.center.clone(),
            "teacher": {k: v.clone() for k, v in model.teacher.state_dict().items()}}
    mp.spawn(_dist_worker, args=(2, f"tcp://127.0.0.1:{_free_port()}", case), nprocs=2, join=True)


# ---------------------------------------------------------------- runs

@pytest.mark.slow
def test_last_layer_frozen_first_epoch_then_moves_and_resume_equals_the_uninterrupted_run(tmp_path, capsys,
                                                                                         no_view_check):
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert run_main(main_dino.main, TINY + ["--epochs", "2", "--output-dir", str(straight)]) == 0
    assert run_main(main_dino.main, TINY + ["--epochs", "2", "--stop-at-epoch", "1", "--output-dir", str(split)]) == 0
    first = load(split / "checkpoint_last.pth.tar")
    # epoch 0: the student's last layer stayed at its start, so the teacher's EMA of it too (up to the EMA's
    # rounding of m x + (1 - m) x); the rest moved
    v, mlp = "head.last_layer.weight_v", "head.mlp.0.weight"
    torch.testing.assert_close(first["student"][v], first["teacher"][v], rtol=1e-6, atol=1e-8)
    assert (first["student"][mlp] - first["teacher"][mlp]).abs().max() > 1e-4
    assert run_main(main_dino.main, TINY + ["--epochs", "2", "--output-dir", str(split), "--resume", "auto"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert_same_weights(straight / "checkpoint_last.pth.tar", split / "checkpoint_last.pth.tar")
    ckpt = load(straight / "checkpoint_last.pth.tar")
    assert not torch.equal(ckpt["student"][v], first["student"][v])  # epoch 1: it learns
    assert torch.equal(ckpt["student"]["head.last_layer.weight_g"], torch.ones(32, 1))  # --norm-last-layer
    assert ckpt["method"] == "dino" and {k.split(".")[1] for k in ckpt["state_dict"]} == {"student", "teacher",
                                                                                          "loss"}
    # DINO's layout, the same tensors as the state_dict; the teacher is what evaluation takes
    assert all(k.startswith(("backbone.", "head.")) for k in list(ckpt["student"]) + list(ckpt["teacher"]))
    assert torch.equal(ckpt["teacher"]["backbone.conv1.weight"],
                       ckpt["state_dict"]["module.teacher.backbone.conv1.weight"])
    weights, layout = extract_backbone(ckpt["state_dict"])
    assert layout == "module.teacher.backbone" and torch.equal(weights["conv1.weight"],
                                                               ckpt["teacher"]["backbone.conv1.weight"])
    # DINO's eval_linear.py rule: ckpt["teacher"], "module." and "backbone." stripped, strict=False
    model = tvm.resnet18()
    model.fc = nn.Identity()
    state = {k.replace("module.", "").replace("backbone.", ""): v for k, v in ckpt["teacher"].items()}
    assert model.load_state_dict(state, strict=False).missing_keys == []
    assert torch.equal(model.conv1.weight, ckpt["teacher"]["backbone.conv1.weight"])


def test_entropy_watch_tells_uniform_and_one_dimension_collapse():
    watch = EntropyWatch(32, "a hint")  # log(32) = 3.466
    assert watch.message(3.40, 3.45, 0.11) is None  # the healthy TINY run's last epoch (docs/dino.md)
    assert "uniform" in watch.message(3.465, 3.466, 0.04) and "a hint" in watch.message(3.465, 3.466, 0.04)
    assert watch.message(3.465, 3.466, 0.2) is None  # uniform teacher, but the student still learns from it
    assert "same dimension" in watch.message(0.4, 0.5, 0.05)
    assert watch.step(0.4, 0.5, 0.05) and watch.step(0.4, 0.5, 0.05) is None  # once per collapse
    assert watch.step(2.0, 2.5, 0.3) is None and watch.step(0.4, 0.5, 0.05)
    assert watch.update(0, 0.4, 0.5, 0.05) and watch.update(1, 0.4, 0.5, 0.05) and watch.stuck_epochs == 2
    assert watch.update(2, 2.0, 2.5, 0.3) is None and watch.stuck_epochs == 0


@pytest.mark.slow
@pytest.mark.parametrize("collapse", [["--center-momentum", "1"],  # no centring: one dimension
                                      ["--center-momentum", "0", "--teacher-temp", "1", "--warmup-teacher-temp", "1"]])
def test_a_collapsing_run_stops_within_a_tenth_of_its_budget(tmp_path, capsys, no_view_check, collapse):
    """--stop-if-not-learning on the collapse watch: 40 epochs budgeted, stopped (exit 3) after
    at most 4; the measured levels are docs/dino.md's (the collapse watch)."""
    out = tmp_path / "run"
    argv = TINY + ["--epochs", "40", "--stop-if-not-learning", "--knn-every", "0", "--output-dir", str(out)]
    assert run_main(main_dino.main, argv + collapse) == NOT_LEARNING_EXIT
    assert "WARNING: " in capsys.readouterr().out
    epochs = [json.loads(line) for line in open(out / "metrics.jsonl") if '"epoch"' in line]
    assert len(epochs) <= 4 and epochs[-1]["not_learning"] and epochs[-2]["not_learning"]


@pytest.mark.long
@pytest.mark.slow
def test_sigusr1_mid_epoch_requeues_and_the_resume_reproduces_the_run(tmp_path):
    """Preempted in the middle of epoch 1 (after the frozen epoch): the centre, the teacher and
    the momentum buffers come back exactly."""
    script = os.path.join(ROOT, "main_dino.py")
    argv = TINY + ["--epochs", "2", "-p", "1"]
    straight = tmp_path / "straight"
    subprocess.run([sys.executable, script] + argv + ["--output-dir", str(straight)], cwd=ROOT, env=clean_env(),
                   check=True, capture_output=True, timeout=CHILD_WAIT_S)
    out = tmp_path / "stopped"
    argv += ["--output-dir", str(out), "--resume", "auto"]
    env = clean_env(SLURM_JOB_ID=4242, PATH="/nonexistent")
    with subprocess.Popen([sys.executable, script] + argv, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL) as proc:
        try:
            wait_for_line(proc, "Epoch [1/2][1/4]")
            proc.send_signal(signal.SIGUSR1)
            proc.communicate(timeout=CHILD_WAIT_S)
        except BaseException:
            proc.kill()
            raise
    assert proc.returncode == REQUEUE_EXIT_CODE
    mid = load(out / "checkpoint_last.pth.tar")
    assert {"teacher", "student"} <= set(mid) and (mid["epoch"], min(mid["iteration"], 1)) == (1, 1)
    assert mid["iteration"] < 4  # stopped inside epoch 1, its DINO keys written as at an epoch end
    done = subprocess.run([sys.executable, script] + argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, timeout=CHILD_WAIT_S)
    assert not done.returncode, done.stderr[-3000:]
    assert_same_weights(straight / "checkpoint_last.pth.tar", out / "checkpoint_last.pth.tar")
    a, b = load(straight / "checkpoint_last.pth.tar"), load(out / "checkpoint_last.pth.tar")
    assert torch.equal(a["state_dict"]["module.loss.center"], b["state_dict"]["module.loss.center"])


def official_layout(backbone: dict, out_dim: int = 16) -> dict:
    """A dict shaped like facebookresearch/dino's checkpoint: `student` as DDP writes it
    (`module.backbone.*`), `teacher` bare, heads beside; no `state_dict`."""
    head = {"head.mlp.0.weight": torch.randn(32, 8), "head.last_layer.weight_g": torch.ones(out_dim, 1),
            "head.last_layer.weight_v": torch.randn(out_dim, 8)}
    student = {"module.backbone." + k: v + 1 for k, v in backbone.items()}  # not the teacher's weights
    student.update({"module." + k: v for k, v in head.items()})
    return {"student": student, "teacher": {**{"backbone." + k: v for k, v in backbone.items()}, **head},
            "epoch": 100}


@pytest.mark.slow
def test_an_official_dino_checkpoint_loads_in_lincls_knn_export_and_init(tmp_path, capsys, no_view_check):
    torch.manual_seed(0)
    resnet = tvm.resnet18()
    resnet.fc = nn.Identity()  # as DINO builds its ResNets
    teacher = resnet.state_dict()
    path = tmp_path / "dino_resnet18.pth"
    torch.save(official_layout(teacher), path)
    backbone = build_backbone("resnet18", small_images=False)
    load_backbone(backbone, load_checkpoint(str(path)))
    assert torch.equal(backbone.conv1.weight, teacher["conv1.weight"])  # the teacher, as DINO evaluates
    data = SYNTHETIC + ["--synthetic-size", "64", "-b", "16", "-p", "100", "--pretrained", str(path)]
    run_inline(capsys, main_knn.main, data + ["--output-dir", str(tmp_path / "knn")])
    run_inline(capsys, main_lincls.main, data + ["--probe", "logreg", "--output-dir", str(tmp_path / "lincls")])
    exported = tmp_path / "exported.pth"
    subprocess.run([sys.executable, os.path.join(ROOT, "export_backbone.py"), str(path), "-a", "resnet18",
                    "--no-small-images", "--output", str(exported)], cwd=ROOT, env=clean_env(), check=True,
                   capture_output=True, timeout=CHILD_WAIT_S)
    assert torch.equal(load(exported)["conv1.weight"], teacher["conv1.weight"])
    # --init: our DINO starts from it
    out = tmp_path / "init"
    assert run_main(main_dino.main, TINY + ["--epochs", "1", "--stop-at-epoch", "1", "--init", str(path), "--lr", "0", "--min-lr", "0",
                                            "--clip-grad", "0", "--output-dir", str(out)]) == 0
    ours = load(out / "checkpoint_last.pth.tar")
    assert torch.equal(ours["student"]["backbone.conv1.weight"], teacher["conv1.weight"])  # lr 0: still the init

    # a ViT as DINO's vision_transformer.py names it (timm's names) in the same layout
    vit = build_backbone("vit_tiny")
    vit.fc = nn.Identity()
    timm = torchvision_to_timm({k[len("body."):]: v for k, v in vit.state_dict().items()})
    torch.save(official_layout(timm), tmp_path / "dino_vit.pth")
    fresh = build_backbone("vit_tiny")
    load_backbone(fresh, load_checkpoint(str(tmp_path / "dino_vit.pth")))
    for k, v in vit.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_a_released_full_checkpoint_with_an_argparse_namespace_loads_and_other_pickles_are_refused(tmp_path):
    """DINO's released *_full_checkpoint.pth pickle its flags (`args`, an argparse.Namespace):
    main_lincls' loader (follow_checkpoint, load_pretrained) and --init's read them; any other
    pickled object, inside the Namespace too, is refused in the one sentence."""
    import argparse
    from fractions import Fraction

    from common.ckpt.init_weights import read_init
    from common.ckpt.pretrained import follow_checkpoint, load_pretrained
    from common.errors import UserError
    torch.manual_seed(0)
    resnet = tvm.resnet18()
    resnet.fc = nn.Identity()
    teacher = resnet.state_dict()
    path = tmp_path / "dino_resnet18_pretrain_full_checkpoint.pth"
    dino_args = argparse.Namespace(arch="resnet18", out_dim=16, lr=0.03, global_crops_scale=(0.14, 1.0))
    torch.save({**official_layout(teacher), "args": dino_args, "dino_loss": {"center": torch.zeros(1, 16)}}, path)
    args = argparse.Namespace(in_channels=None, channel_norm=None, seed=0, pretrained=str(path), arch=None, crop_size=None, small_images=None,
                              dataset="synthetic")
    follow_checkpoint(args)  # main_lincls' and main_knn's first read
    assert args.arch == "resnet50"  # DINO stores no top-level arch: the default (-a picks another)
    ckpt = load_pretrained(str(path), "resnet18")
    assert ckpt["args"]["out_dim"] == 16 and ckpt["args"]["lr"] == 0.03  # the Namespace as a dict, as ours
    backbone = build_backbone("resnet18", small_images=False)
    load_backbone(backbone, ckpt)
    assert torch.equal(backbone.conv1.weight, teacher["conv1.weight"])
    assert torch.equal(read_init(str(path), "resnet18")["state_dict"]["backbone.conv1.weight"], teacher["conv1.weight"])
    for bad in ({"state_dict": {}, "args": Fraction(1, 3)},
                {"state_dict": {}, "args": argparse.Namespace(lr=Fraction(1, 3))}):
        torch.save(bad, tmp_path / "foreign.pth.tar")
        with pytest.raises(UserError, match="it holds pickled Python objects besides tensors") as e:
            load_checkpoint(str(tmp_path / "foreign.pth.tar"))
        assert "\n" not in str(e.value)
        with pytest.raises(UserError, match="cannot read --init"):
            read_init(str(tmp_path / "foreign.pth.tar"), "resnet18")


@pytest.mark.slow
def test_a_vit_checkpoint_has_dinos_vit_names(tmp_path, no_view_check):
    """-a vit_tiny with AdamW (DINO's ViT recipe): the teacher in DINO's ViT names (what its
    vision_transformer.py's VisionTransformer holds for depth 2), and main_lincls' loading rule
    gives back the state_dict's teacher."""
    argv = SYNTHETIC[:2] + ["-a", "vit_tiny", "-j", "0", "--synthetic-size", "32", "-b", "16", "--out-dim", "32",
                            "--local-crops-number", "1", "--epochs", "1", "--no-payoff", "--output-dir", str(tmp_path)]
    assert run_main(main_dino.main, argv) == 0
    ckpt = load(tmp_path / "checkpoint_last.pth.tar")
    assert ckpt["args"]["optimizer"] == "adamw" and ckpt["args"]["global_crops_scale"] == [0.4, 1.0]
    names = {k[len("backbone."):] for k in ckpt["teacher"] if k.startswith("backbone.")}
    per_block = [f"{m}.{p}" for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
                 for p in ("weight", "bias")]
    assert names == {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight",
                     "norm.bias"} | {f"blocks.{i}.{n}" for i in range(2) for n in per_block}
    assert {k[len("module.backbone."):] for k in ckpt["student"] if k.startswith("module.backbone.")} == set() and \
        {k[len("backbone."):] for k in ckpt["student"] if k.startswith("backbone.")} == names  # one process
    fresh = build_backbone("vit_tiny")
    load_backbone(fresh, load_checkpoint(str(tmp_path / "checkpoint_last.pth.tar")))
    assert torch.equal(fresh.body.class_token, ckpt["state_dict"]["module.teacher.backbone.body.class_token"])


def test_bad_flags_are_one_sentence(tmp_path, capsys):
    for bad in (["--crop-min", "0.3"], ["--global-crops-scale", "0.5", "0.2"], ["--teacher-temp", "0"],
                ["--gpu-decode"]):
        code = run_main(main_dino.main, TINY + bad + ["--output-dir", str(tmp_path / "x"), "--overwrite"])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err, (bad, err)


# 512 images, 3 epochs of 8 steps, 2 global + 2 local crops, a 256-prototype head, SGD at a rate that moves
# 24 steps, a fast teacher (momentum 0.9), mild colour jitter (the synthetic class is the hue)
LEARN = SYNTHETIC + ["--synthetic-size", "512", "-b", "64", "-p", "1000", "--no-payoff", "--out-dim", "256",
                     "--local-crops-number", "2", "--color-strength", "0.25", "--epochs", "3", "--optimizer", "sgd",
                     "--lr", "0.5", "--wd", "1e-4", "--warmup-epochs", "0", "--momentum-teacher", "0.9"]


@pytest.mark.long
@pytest.mark.slow
def test_a_short_run_beats_the_untrained_network_under_knn(tmp_path, no_view_check):
    """The teacher's backbone after LEARN, kNN top-1 on the learning tests' bank (conftest.learning_knn)
    against the untrained network (BatchNorm recalibrated: 65.6). Measured (docs/dino.md, 2 shared
    CPU cores, one thread): seeds 1-4 gave 76.8 / 74.4 / 80.1 / 75.4 (mean 76.7, sd 2.5), 8.8 to 14.5
    above the control. Margin 5: two seed sds, the smallest gap seen 1.5 sds above it. The same
    healthy run is never called collapsed by the watch (--stop-if-not-learning would stop it)."""
    from conftest import learning_knn, untrained_knn
    knn = learning_knn(tmp_path / "knn")
    control = untrained_knn(knn)
    out = tmp_path / "run"
    assert run_main(main_dino.main, LEARN + ["--seed", "1", "--stop-if-not-learning", "--output-dir", str(out)]) == 0
    epochs = [json.loads(line) for line in open(out / "metrics.jsonl") if '"epoch"' in line]
    assert len(epochs) == 3 and not any(e["not_learning"] for e in epochs)
    backbone = build_backbone("resnet18", small_images=False)
    load_backbone(backbone, load_checkpoint(str(out / "checkpoint_last.pth.tar")))
    learned = knn.evaluate(backbone)["knn_top1"]
    print(f"kNN top-1: untrained {control:.1f}, DINO {learned:.1f}")
    assert learned > control + 5


def test_vit_small_has_dinos_vit_s16_shape_and_its_layout_loads(tmp_path):
    """-a vit_small is DINO's ViT-S/16 (DeiT-S): its weights in DINO's (timm's) names have the
    released dino_deitsmall16_pretrain.pth's keys and shapes, and that layout loads back."""
    vit = build_backbone("vit_small")
    vit.fc = nn.Identity()
    timm = torchvision_to_timm({k[len("body."):]: v for k, v in vit.state_dict().items()})
    released = {"cls_token": (1, 1, 384), "pos_embed": (1, 197, 384), "patch_embed.proj.weight": (384, 3, 16, 16),
                "blocks.0.attn.qkv.weight": (1152, 384), "blocks.11.mlp.fc1.weight": (1536, 384),
                "blocks.11.mlp.fc2.weight": (384, 1536), "norm.weight": (384,)}
    for k, shape in released.items():
        assert tuple(timm[k].shape) == shape, k
    assert sum(v.numel() for v in timm.values()) == 21_665_664  # ViT-S/16: 21.7M
    torch.save(official_layout(timm), tmp_path / "dino_vits16.pth")
    fresh = build_backbone("vit_small")
    load_backbone(fresh, load_checkpoint(str(tmp_path / "dino_vits16.pth")))
    for k, v in vit.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_every_dino_crop_is_resized_bicubically_as_dinos_repo():
    """DINO's RandomResizedCrop(..., interpolation=Image.BICUBIC), global and local crops alike:
    the loader's crop is PIL's bicubic resize of the drawn box, and the device decode path
    (common/augment/gpu_decode.py) resizes the same box bicubically too."""
    from torchvision import transforms
    from common.augment import gpu_decode
    from dino.augment import dino_views
    views = dino_views(32, 16, 2, (0.4, 1.0), (0.05, 0.4))
    assert [v.interpolation for v in views] == ["bicubic"] * 4 and "(bicubic)" in views[0].describe()
    rng = np.random.default_rng(0)
    img = Image.fromarray(np.asarray(Image.fromarray(rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)).resize(
        (60, 44), Image.BILINEAR)))
    for view in (views[0], views[2]):
        crop = view._op("crop")
        torch.manual_seed(3)
        out = np.asarray(crop(img))
        torch.manual_seed(3)
        i, j, h, w = transforms.RandomResizedCrop.get_params(img, crop.scale, crop.ratio)
        size = view.crop_size
        assert np.array_equal(out, np.asarray(img.crop((j, i, j + w, i + h)).resize((size, size), Image.BICUBIC)))
        bilinear = np.asarray(img.crop((j, i, j + w, i + h)).resize((size, size), Image.BILINEAR))
        assert not np.array_equal(out, bilinear)
        geometry = torch.tensor([[i, j, h, w, 0]])
        dev = gpu_decode.resized_crops([torch.from_numpy(np.array(img)).permute(2, 0, 1)], geometry, size, "bicubic")
        # torch's antialiased bicubic against PIL's: rounding differs (measured 0.21 levels on average)
        assert float((dev[0].permute(1, 2, 0).float() - torch.from_numpy(out).float()).abs().mean()) < 1.0


def test_recipe_small_sets_the_benchmarks_small_data_dino_and_a_resumed_run_keeps_it(tmp_path, capsys):
    """--recipe small: epochs for 100,000 images seen, batch 64, a 4,096-prototype head, 2 local
    crops, teacher momentum 0.99 and at small crops global 0.3-1 / local 0.05-0.3 (bench/quality.py's
    DINO), DINO's SGD values for a ResNet; flags typed are kept; a resume keeps its values."""
    def finalize(*extra):
        return main_dino.finalize_args(main_dino.get_args_parser().parse_args(
            ["--dataset", "synthetic", "--synthetic-size", "500", "-a", "resnet18", "--recipe", "small",
             "--output-dir", str(tmp_path), *extra]))
    args = finalize("--local-crops-number", "4")
    assert (args.epochs, args.batch_size, args.out_dim, args.momentum_teacher) == (200, 64, 4096, 0.99)
    assert args.local_crops_number == 4 and args.crop_size == 32 and args.local_crop_size == 16
    assert args.global_crops_scale == [0.3, 1.0] and args.local_crops_scale == [0.05, 0.3]
    assert (args.optimizer, args.lr, args.weight_decay) == ("sgd", 0.03, 1e-4)
    said = capsys.readouterr().out
    assert "--global-crops-scale 0.3 1 --local-crops-scale 0.05 0.3" in said
    assert "--global-crops-scale 0.14" not in said  # DINO's default, which the recipe replaces, is never shown
    big = finalize("--crop-size", "96")  # past the recipe's small crops: DINO's own scales, shown as its defaults
    assert big.global_crops_scale == [0.14, 1.0] and "defaults for -a resnet18: --global-crops-scale 0.14 1" in \
        capsys.readouterr().out
    torch.save({"method": "dino", "epoch": 1, "state_dict": {}, "args": {**vars(args), "epochs": 7}},
               tmp_path / "checkpoint_last.pth.tar")
    assert finalize("--resume", "auto", "--local-crops-number", "4").epochs == 7
