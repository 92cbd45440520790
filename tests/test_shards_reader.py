"""`--dataset shards` (common/data/shard_reader.py, shard_order.py; docs/shards.md): shards of
make_shards.py and of an independent writer read the same samples; the training order sees
every sample once an epoch over 1, 2 and 4 real gloo processes with uneven shards; a
mid-epoch SIGUSR1 + `--resume auto` reproduces the run; each broken shard is one sentence,
or a counted skip without --strict-data."""
import argparse
import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import CHILD_WAIT_S, ROOT, assert_same_weights, clean_env, run_inline, write_image_folder
from PIL import Image
from test_slurm import signal_after_line

import main_curate
import main_knn
import main_lincls
import main_simclr
import make_shards
from common.augment.gpu_decode import EncodedImage, read_sample
from common.data.datasets import build_dataset
from common.data.loader import make_loader
from common.data.shard_order import ShardOrderSampler
from common.data.shard_reader import ShardDataset, expand_braces, shard_dataset
from common.data.transformed import TransformedDataset
from common.distributed.collectives import DistEnv
from common.errors import UserError
from common.train.preempt import REQUEUE_EXIT_CODE


def write_tar(path, samples, end=True):
    """An independent writer: plain tarfile, WebDataset naming; samples = [(key, {ext: bytes})]."""
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    if not end:  # cut the end-of-archive blocks off: a copy interrupted at a member boundary
        size = sum(512 + -(-len(d) // 512) * 512 for _, m in samples for d in m.values())
        with open(path, "r+b") as f:
            f.truncate(size)


def jpeg(seed, size=24):
    arr = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def args_for(data, **kw):
    base = dict(dataset="shards", data=str(data), strict_data=False, shuffle_buffer=8, in_channels=None)
    base.update(kw)
    return argparse.Namespace(**base)


# ---------------------------------------------------------------- reading

def test_make_shards_output_reads_back_as_the_folder_it_came_from(tmp_path):
    data = write_image_folder(tmp_path / "data", classes=("a", "b", "c"), per_class=6, split_dirs=("train", "val"))
    out = tmp_path / "shards"
    for split in ("train", "val"):
        assert make_shards.main([data, str(out), "--split", split, "--shard-size", "40KB"]) in (None, 0)
    folder = build_dataset(argparse.Namespace(in_channels=None, dataset="imagefolder", data=data), "train")
    for split in ("train", "val"):
        ds = build_dataset(args_for(out), split)
        assert isinstance(ds, ShardDataset) and len(ds.paths) > 1 and len(ds) == 18
        assert ds.classes == ["a", "b", "c"]
        src = build_dataset(argparse.Namespace(in_channels=None, dataset="imagefolder", data=data), split)
        want = sorted((open(p, "rb").read(), t) for p, t in src.samples)
        got = sorted((ds.read_bytes(i), ds.targets[i]) for i in range(len(ds)))
        assert got == want  # every image once, bytes unchanged, its class
        img, target = ds[0]
        assert img.mode == "RGB" and img.size == (16, 16)
        assert ds.path(0).startswith(os.path.join(str(out), f"{split}-0000")) and ds.path(0).endswith(":000000")
    assert folder.classes == ds.classes


def test_an_independent_writers_shards_read_by_folder_pattern_and_list(tmp_path):
    """Keys with folders and dots after the first, .txt class names, .json labels, an extra
    member, a pax header: what webdataset users' tools write."""
    d = tmp_path / "web"
    d.mkdir()
    images = {f"s{i:03d}": jpeg(i) for i in range(10)}
    names = ["cat", "dog"]
    write_tar(d / "part-0.tar", [(f"x/s{i:03d}", {"jpg": images[f"s{i:03d}"], "txt": names[i % 2].encode()})
                                 for i in range(4)])
    write_tar(d / "part-1.tar", [(f"x/s{i:03d}", {"json": json.dumps({"label": names[i % 2]}).encode(),
                                                  "jpg": images[f"s{i:03d}"], "meta.json": b"{}"})
                                 for i in range(4, 10)])
    with tarfile.open(d / "part-2.tar", "w", format=tarfile.PAX_FORMAT) as tar:  # pax: read by tarfile
        info = tarfile.TarInfo("y/" + "long" * 30 + ".jpg")
        data = jpeg(99)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    (tmp_path / "list.txt").write_text("# my shards\nweb/part-0.tar\n\nweb/part-1.tar\n")
    for spec in (d, str(d / "part-{0..1}.tar"), tmp_path / "list.txt"):
        ds = shard_dataset(str(spec), "train", strict=False, shuffle_buffer=0)
        n = 11 if spec == d else 10
        assert len(ds) == n and ds.classes == names
        for i in range(10):
            assert ds.read_bytes(i) == images[ds.keys[i].split("/")[1]]
            assert ds.targets[i] == int(ds.keys[i][-1]) % 2
        if spec == d:
            assert ds.targets[10] == -1 and ds.keys[10] == "y/" + "long" * 30 and ds.read_bytes(10) == data
        assert shard_dataset(str(spec), "val", strict=False, shuffle_buffer=0) is None
    assert expand_braces("a-{08..11}.tar") == ["a-08.tar", "a-09.tar", "a-10.tar", "a-11.tar"]
    assert expand_braces("{1..2}-{0..1}") == ["1-0", "1-1", "2-0", "2-1"]


def test_gpu_decode_takes_the_jpeg_bytes_from_the_shard(tmp_path):
    write_tar(tmp_path / "a.tar", [("k0", {"jpg": jpeg(1), "cls": b"0"}), ("k1", {"png": _png(), "cls": b"1"})])
    ds = shard_dataset(str(tmp_path / "a.tar"), "train", strict=False, shuffle_buffer=0)
    enc, t = read_sample(ds, 0)
    assert isinstance(enc, EncodedImage) and enc.data == jpeg(1) and (enc.width, t) == (24, 0)
    img, t = read_sample(ds, 1)  # not a JPEG: decoded by the worker, as for files
    assert isinstance(img, Image.Image) and t == 1


def _png():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, "PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- broken shards

def _three_good(tmp_path):
    write_tar(tmp_path / "a.tar", [(f"k{i}", {"jpg": jpeg(i), "cls": b"0"}) for i in range(3)])


@pytest.mark.parametrize("case", ["truncated", "no end blocks", "label without image", "member without image",
                                  "damaged header"])
def test_a_broken_shard_is_one_sentence_or_a_counted_skip(tmp_path, capsys, case):
    _three_good(tmp_path)
    bad = tmp_path / "b.tar"
    if case in ("truncated", "damaged header"):
        write_tar(bad, [(f"m{i}", {"jpg": jpeg(10 + i), "cls": b"1"}) for i in range(4)])
        raw = bytearray(bad.read_bytes())
        if case == "truncated":
            raw = raw[:len(raw) // 2]
        else:
            raw[3 * 1024 + 100:3 * 1024 + 200] = b"\xff" * 100  # inside some header or data
            raw = raw[:_header_offsets(bad)[4]] + b"\x01" * 512 + raw[_header_offsets(bad)[4] + 512:]
        bad.write_bytes(bytes(raw))
    elif case == "no end blocks":
        write_tar(bad, [(f"m{i}", {"jpg": jpeg(10 + i), "cls": b"1"}) for i in range(2)], end=False)
    elif case == "label without image":
        write_tar(bad, [("m0", {"jpg": jpeg(10), "cls": b"1"}), ("m1", {"cls": b"1"})])
    else:
        write_tar(bad, [("m0", {"jpg": jpeg(10), "cls": b"1"}), ("m1", {"mp4": b"not an image"})])
    spec = str(tmp_path / "{a,b}.tar").replace("{a,b}", "[ab]")
    (tmp_path / "list.txt").write_text("a.tar\nb.tar\n")
    with pytest.raises(UserError) as e:
        shard_dataset(str(tmp_path / "list.txt"), "train", strict=True, shuffle_buffer=0)
    msg = str(e.value)
    assert "\n" not in msg and "b.tar" in msg and "--strict-data" in msg, msg
    kind = {"truncated": "cut short", "no end blocks": "cut short", "damaged header": "cut short",
            "label without image": "labels without an image", "member without image": "members without an image"}
    assert kind[case] in msg
    capsys.readouterr()
    ds = shard_dataset(str(tmp_path / "list.txt"), "train", strict=False, shuffle_buffer=0)
    err = capsys.readouterr().err
    assert kind[case] in err and "left out" in err and err.count("\n") == 1, err
    assert 3 <= len(ds) < 7 and all(ds.read_bytes(i)[:2] == b"\xff\xd8" for i in range(len(ds)))
    del spec


def _header_offsets(path):
    with tarfile.open(path) as tar:
        return [m.offset for m in tar]


def test_no_shards_and_bad_labels_are_one_sentence_each(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty.txt").write_text("# nothing\n")
    write_tar(tmp_path / "hollow.tar", [])
    write_tar(tmp_path / "mixed.tar", [("a", {"jpg": jpeg(1), "txt": b"cat"}), ("b", {"jpg": jpeg(2), "txt": b"3"})])
    write_tar(tmp_path / "badcls.tar", [("a", {"jpg": jpeg(1), "cls": b"cat"})])
    cases = {str(tmp_path / "empty"): "holds no .tar shards", str(tmp_path / "empty.txt"): "names no shards",
             str(tmp_path / "nope-{0..2}.tar"): "do not exist", str(tmp_path / "hollow.tar"): "hold no images",
             str(tmp_path / "mixed.tar"): "mix class numbers and class names",
             str(tmp_path / "badcls.tar"): "not a class index", "": "needs DATA"}
    for spec, words in cases.items():
        with pytest.raises(UserError) as e:
            shard_dataset(spec, "train", strict=False, shuffle_buffer=0)
        assert words in str(e.value) and "\n" not in str(e.value), (spec, str(e.value))
    with pytest.raises(UserError, match="negative"):
        shard_dataset(str(tmp_path / "mixed.tar"), "train", strict=False, shuffle_buffer=-1)


def test_the_header_cache_is_used_and_a_rewritten_shard_is_read_again(tmp_path, capsys):
    write_tar(tmp_path / "a.tar", [(f"k{i}", {"jpg": jpeg(i), "cls": b"0"}) for i in range(3)])
    shard_dataset(str(tmp_path / "a.tar"), "train", strict=False, shuffle_buffer=0)
    assert "headers read from" not in capsys.readouterr().out
    assert len(shard_dataset(str(tmp_path / "a.tar"), "train", strict=False, shuffle_buffer=0)) == 3
    assert "headers read from" in capsys.readouterr().out
    write_tar(tmp_path / "a.tar", [(f"k{i}", {"jpg": jpeg(i), "cls": b"0"}) for i in range(5)])
    os.utime(tmp_path / "a.tar", ns=(1, 1))  # a rewrite within the same clock tick still changes the size
    ds = shard_dataset(str(tmp_path / "a.tar"), "train", strict=False, shuffle_buffer=0)
    assert len(ds) == 5 and "headers read from" not in capsys.readouterr().out


# ---------------------------------------------------------------- the order

UNEVEN = [(0, 7), (7, 1), (8, 13), (21, 0), (21, 5), (26, 30)]  # 56 samples in 6 shards of uneven size


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_the_order_covers_every_sample_once_an_epoch_with_uneven_shards(world):
    total = 56
    for epoch in range(3):
        ranks = []
        for rank in range(world):
            s = ShardOrderSampler(UNEVEN, world, rank, seed=5, buffer=4)
            s.set_epoch(epoch)
            keys = list(s)
            assert len(keys) == len(s) == total // world
            ranks.append([i for i, _ in keys])
            assert keys == list(zip(ranks[-1], [k for _, k in keys]))
        seen = [i for r in ranks for i in r]
        assert len(seen) == len(set(seen)) == world * (total // world)  # once each; the rest of the cut said:
        assert s.left_out(batch_size=5) == total - world * ((total // world) // 5) * 5
    s0, s1 = ShardOrderSampler(UNEVEN, buffer=4), ShardOrderSampler(UNEVEN, buffer=4)
    s1.set_epoch(1)
    assert [i for i, _ in s0] != [i for i, _ in s1] and s0.shard_order() != s1.shard_order()


def test_the_buffer_mixes_within_a_window_and_a_mid_epoch_start_continues_the_same_order():
    spans = [(a, 100) for a in range(0, 1000, 100)]
    s = ShardOrderSampler(spans, seed=1, buffer=50)
    s.set_epoch(2)
    stream, order = s.stream().tolist(), s.indices()
    assert sorted(order) == sorted(stream) == list(range(1000)) and order != stream
    pos = {idx: p for p, idx in enumerate(stream)}
    # a sample is handed on at most `buffer` reads after it was read: the reads stay inside the shards
    assert all(pos[idx] <= p + 50 for p, idx in enumerate(order))
    assert ShardOrderSampler(spans, seed=1, buffer=0).stream().tolist() == stream[:0] + ShardOrderSampler(
        spans, seed=1, buffer=0).indices()
    full = list(s)
    s.set_epoch(2, start_sample=337)
    assert list(s) == full[337:] and len(s) == 1000 - 337


def _no_pixels(img):
    return torch.zeros(1)


def _gloo_worker(rank, world, port, spec, out, batch, workers):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    env = DistEnv(rank=rank, world_size=world, local_rank=rank, device=torch.device("cpu"), distributed=True)
    ds = TransformedDataset(shard_dataset(spec, "train", strict=True, shuffle_buffer=3),
                            transform=_no_pixels)
    loader, sampler = make_loader(ds, batch, env, workers=workers, seed=7)
    seen = {}
    for epoch in range(2):
        sampler.set_epoch(epoch)
        targets = torch.cat([t for _, t in loader])
        gathered = [torch.zeros_like(targets) for _ in range(world)]
        dist.all_gather(gathered, targets)
        seen[epoch] = torch.cat(gathered).tolist()
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"seen": seen, "left_out": sampler.left_out(batch)}, f)
    dist.destroy_process_group()


@pytest.mark.parametrize("world,workers", [(2, 1), (4, 0)])
def test_real_gloo_processes_see_every_sample_once_an_epoch(tmp_path, world, workers):
    """Uneven shards (0-13 samples), each sample labelled with its own number; the loader of
    each process (a loader worker with 2 processes, none with 4) over real gloo: their batches together hold every sample once,
    the rest is the counted left_out."""
    counts = [7, 1, 13, 0, 5, 11, 3]
    n = 0
    for s, c in enumerate(counts):
        write_tar(tmp_path / f"train-{s:06d}.tar", [(f"{n + i:06d}", {"png": _png(), "cls": str(n + i).encode()})
                                                    for i in range(c)])
        n += c
    port = 29500 + (os.getpid() * 7 + world) % 2000
    out = tmp_path / "seen.json"
    # fork: the processes start with this one's imports (spawn re-imports torch in each, ~5 s apiece)
    mp.start_processes(_gloo_worker, args=(world, port, str(tmp_path), str(out), 4, workers), nprocs=world,
                       start_method="fork")
    result = json.loads(out.read_text())
    for epoch, seen in result["seen"].items():
        assert len(seen) == len(set(seen)) == n - result["left_out"], (epoch, sorted(seen))
        assert set(seen) <= set(range(n))
    assert result["seen"]["0"] != result["seen"]["1"]
    assert result["left_out"] < world * 4


# ---------------------------------------------------------------- a run on shards

SIMCLR = ["--dataset", "shards", "-a", "resnet18", "--crop-size", "16", "-b", "8", "-j", "0", "--seed", "3",
          "-p", "1", "--no-payoff", "--shuffle-buffer", "5", "--epochs", "1"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """32 train and 33 val images in shards; val's last is a byte copy of a train image (a leak)."""
    root = tmp_path_factory.mktemp("shards")
    data = write_image_folder(root / "data", classes=("a", "b"), per_class=16, split_dirs=("train", "val"))
    shutil.copyfile(os.path.join(data, "train", "a", "3.png"), os.path.join(data, "val", "b", "leak.png"))
    for split in ("train", "val"):
        make_shards.main([data, str(root / "shards"), "--split", split, "--shard-size", "30KB"])
    return str(root / "shards")


@pytest.mark.slow
def test_sigusr1_mid_epoch_and_resume_auto_reproduce_the_run_on_shards(tmp_path, shards, capsys):
    straight = tmp_path / "straight"
    run_inline(capsys, main_simclr.main, [shards] + SIMCLR + ["--output-dir", str(straight)])
    out = tmp_path / "out"
    args = [shards] + SIMCLR + ["--output-dir", str(out), "--resume", "auto"]
    env = clean_env(SLURM_JOB_ID=4242, PATH="/nonexistent")
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "main_simclr.py")] + args, cwd=ROOT, env=env,
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen, code, err = signal_after_line(proc, "Epoch [0/1][1/4]", signal.SIGUSR1)
    assert code == REQUEUE_EXIT_CODE, seen + err
    assert "each process reads a run of the" in seen and "every sample is trained on once" in seen
    mid = torch.load(out / "checkpoint_last.pth.tar", map_location="cpu", weights_only=True)
    assert mid["epoch"] == 0 and 1 <= mid["iteration"] < 4
    resumed = run_inline(capsys, main_simclr.main, args)  # the requeued job runs the same command
    assert f"Epoch [0/1][{mid['iteration']}/4]" not in resumed.stdout
    assert_same_weights(straight / "checkpoint_last.pth.tar", out / "checkpoint_last.pth.tar")


def test_knn_lincls_and_curate_read_shards_and_name_shard_and_key(tmp_path, shards, capsys):
    net = ["--dataset", "shards", "--pretrained", "none", "-a", "resnet18", "--crop-size", "16", "-j", "0"]
    knn = run_inline(capsys, main_knn.main, [shards, *net, "--output-dir", str(tmp_path / "knn"), "--retrieval", "2"])
    assert "33 val" in knn.stdout or "val 33" in knn.stdout
    listed = "".join(open(os.path.join(r, f)).read() for r, _, fs in os.walk(tmp_path / "knn") for f in fs
                     if f.endswith(".csv"))
    assert os.path.join(shards, "val-0000") in listed and ".tar:0000" in listed  # which shard, which key
    run_inline(capsys, main_lincls.main, [shards, *net, "--epochs", "1", "-b", "8", "--output-dir",
                                          str(tmp_path / "lin")])
    run_inline(capsys, main_curate.main, [shards, *net, "--output-dir", str(tmp_path / "cur"), "--findings",
                                          "duplicates"])
    with open(tmp_path / "cur" / "duplicates.csv") as f:
        rows = list(csv.DictReader(f))
    exact = [r for r in rows if r["test"] == "sha256"]
    assert len(exact) == 1 and (exact[0]["split_a"], exact[0]["split_b"]) == ("train", "val"), rows  # the leak
    assert ".tar:" in exact[0]["path_a"] and os.path.join(shards, "val-") in exact[0]["path_b"]
