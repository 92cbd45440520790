"""The output folders of main_curate.py and main_knn.py hold one run: a folder with an earlier
run's outputs is refused in one sentence, --overwrite replaces them, main_curate.py --resume
reuses the embeddings and rewrites everything else, so no finding of an earlier run is left
beside this run's. Neighbour counts beyond the data are one sentence; SIGTERM while embedding
says how to continue; hostile inputs (read-only DATA, an output folder inside DATA, one image,
an empty folder, a csv manifest) work or are refused in one sentence."""
import builtins
import hashlib
import os
import signal
import subprocess
import sys

import pytest
from conftest import CHILD_WAIT_S, ROOT, clean_env, run_inline, wait_for_line, write_image_folder

import main_curate
import main_knn

# random-init resnet18 at 32 px: the features do not matter here, only which files appear
NET = ["--pretrained", "none", "-a", "resnet18", "--no-small-images", "--crop-size", "32", "-j", "0", "-p", "1000"]
# 16 images: the curation's neighbourhoods must leave images out (--dup-k etc. below 15)
CURATE = NET + ["--probe-iters", "20", "--dup-k", "3", "--outlier-k", "4", "--label-k", "4"]


def tree(folder) -> dict:
    """Every file under `folder` (relative path -> sha256), the run lock left out."""
    out = {}
    for dp, _, fs in os.walk(folder):
        for f in fs:
            path = os.path.join(dp, f)
            if f != "run.lock":
                with open(path, "rb") as fh:
                    out[os.path.relpath(path, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def one_sentence(ran) -> str:
    lines = [ln for ln in ran.stderr.strip().splitlines() if ln]
    assert ran.returncode == 2 and len(lines) == 1 and "Traceback" not in ran.stderr, ran.stderr
    return lines[0]


@pytest.fixture
def labelled_and_pool(tmp_path):
    """DATA: two classes of 6 images, and an unlabelled pool of 4."""
    data = write_image_folder(tmp_path / "data", classes=("a", "b"), per_class=6, size=32, split_dirs=("",))
    pool = write_image_folder(tmp_path / "pool", classes=("",), per_class=4, size=32, split_dirs=("",), seed=1)
    return data, pool


@pytest.mark.slow
def test_curation_rerun_leaves_no_finding_of_the_earlier_run(labelled_and_pool, tmp_path, capsys):
    data, pool = labelled_and_pool
    out = str(tmp_path / "out")
    first = [data, *CURATE, "--unlabelled", pool, "--select", "2", "--write-clean-csv", "--shard-size", "8",
             "--output-dir", out]
    run_inline(capsys, main_curate.main, first)
    names = set(os.listdir(out))
    assert {"select.csv", "clean_train.csv", "clean_unlabelled.csv", "label_suggestions.csv"} <= names
    # main_curate.OUTPUTS is the whole list: every name a run writes is one it would find and remove
    assert all(main_curate.RUN_FILES.match(n) for n in names), names
    before = tree(out)

    # other flags, no pool: without --resume or --overwrite the folder is refused, not a byte changed
    second = [data, *CURATE, "--findings", "duplicates", "outliers", "--shard-size", "8", "--output-dir", out]
    msg = one_sentence(run_inline(capsys, main_curate.main, second, check=False))
    assert "already holds a run" in msg and "--resume to continue it (its embeddings are reused)" in msg
    assert tree(out) == before
    # a run that is refused later (a flag against the data, a bad flag) deletes nothing either
    for flags in (["--overwrite", "--dup-k", "100000"], ["--resume", "--dup-ratio", "1.5"]):
        one_sentence(run_inline(capsys, main_curate.main, second + flags, check=False))
        assert tree(out) == before

    # --resume: the train shards are reused, every other output is this run's; the folder is
    # exactly what a fresh run with these flags writes
    ran = run_inline(capsys, main_curate.main, second + ["--resume"])
    assert "=> --resume: removed the earlier run's" in ran.stdout and "2 of 2 embedding shard(s) reused" in ran.stdout
    fresh = str(tmp_path / "fresh")
    run_inline(capsys, main_curate.main, second[:-1] + [fresh])
    assert set(tree(out)) == set(tree(fresh))
    assert not any(n.startswith(("clean_", "select", "label_", "embeddings/unlabelled")) for n in tree(out))

    # --overwrite: everything goes, the embeddings too
    ran = run_inline(capsys, main_curate.main, first + ["--overwrite"])
    assert "=> --overwrite: removed the earlier run's" in ran.stdout and "shard(s) reused" not in ran.stdout
    assert set(tree(out)) == set(before)
    assert "pass one of the two" in one_sentence(
        run_inline(capsys, main_curate.main, first + ["--resume", "--overwrite"], check=False))


@pytest.mark.slow
def test_knn_into_an_occupied_folder_is_refused_and_overwrite_leaves_only_the_new_run(tmp_path, capsys):
    data = write_image_folder(tmp_path / "data", classes=("a", "b"), per_class=4, size=32, split_dirs=("train", "val"))
    out = str(tmp_path / "out")
    base = [data, *NET, "-b", "4", "--knn-k", "3"]
    first = base + ["--export-embeddings", "--retrieval", "2", "--label-fraction", "0.5", "--output-dir", out]
    run_inline(capsys, main_knn.main, first)
    names = set(os.listdir(out))
    assert {"knn_results.json", "embeddings", "retrieval", "label_subset.json"} <= names
    assert all(main_knn.RUN_FILES.match(n) for n in names), names  # main_knn.OUTPUTS lists them all
    before = tree(out)

    second = base + ["--knn-k", "5", "--output-dir", out]
    msg = one_sentence(run_inline(capsys, main_knn.main, second, check=False))
    assert "already holds an evaluation (embeddings, knn_per_class.csv, knn_per_class_k3.csv, ...)" in msg
    assert "pass another --output-dir, or --overwrite to replace it" in msg and "--resume" not in msg
    assert tree(out) == before
    # the earlier draw as this run's --label-subset would be deleted by --overwrite before it is read
    assert "copy it out of" in one_sentence(run_inline(capsys, main_knn.main, second + [
        "--overwrite", "--label-subset", os.path.join(out, "label_subset.json")], check=False))
    # a run refused by a later check deletes nothing with --overwrite
    assert "--whiten must be" in one_sentence(run_inline(capsys, main_knn.main, second + ["--overwrite", "--whiten",
                                                                                         "-1"], check=False))
    assert tree(out) == before

    ran = run_inline(capsys, main_knn.main, second + ["--overwrite"])
    assert "=> --overwrite: removed the earlier run's embeddings, knn_per_class.csv" in ran.stdout
    fresh = str(tmp_path / "fresh")
    run_inline(capsys, main_knn.main, second[:-1] + [fresh])
    assert set(tree(out)) == set(tree(fresh)) == {"knn_results.json", "knn_per_class.csv", "knn_per_class_k5.csv"}


@pytest.mark.slow
def test_neighbour_counts_beyond_the_data_are_one_sentence(labelled_and_pool, tmp_path, capsys):
    """12 images, 6 a class: each has 11 others, so k must stay below 11 (at 11 the k-th is the
    farthest image, as it would be at 100000); checked before anything is embedded."""
    data, _ = labelled_and_pool
    out = tmp_path / "out"

    def run(*flags):
        return run_inline(capsys, main_curate.main, [data, *CURATE, *flags, "--output-dir", str(out)], check=False)

    msg = one_sentence(run("--dup-k", "100000"))
    assert msg.endswith("--dup-k 100000 must be less than the 11 images each image can have as neighbours (at 11 or "
                        "more the neighbourhood is every image, its scale the farthest one); pass --dup-k 10 or less")
    assert "pass --outlier-k 10 or less" in one_sentence(run("--outlier-k", "11"))
    assert "pass --label-k 10 or less" in one_sentence(run("--label-k", "11"))
    assert "the largest class (--outlier-per-class)" in one_sentence(run("--outlier-per-class", "--outlier-k", "5"))
    assert not os.path.exists(out / "embeddings")
    # a finding left out is not checked, and the largest valid k runs
    ran = run_inline(capsys, main_curate.main, [data, *CURATE, "--findings", "duplicates", "--dup-k", "10",
                                                "--label-k", "100", "--output-dir", str(out)])
    assert "from the 10 nearest embeddings and thumbnails" in ran.stdout
    two = tmp_path / "two"
    write_image_folder(two, classes=("",), per_class=2, size=32, split_dirs=("",))
    assert "each image has 1 possible neighbour(s), too few" in one_sentence(run_inline(
        capsys, main_curate.main, [str(two), *NET, "--output-dir", str(tmp_path / "out2")], check=False))


@pytest.mark.slow
def test_sigterm_while_embedding_says_how_to_continue_and_resume_completes(tmp_path):
    """SIGTERM once the third shard's progress line is printed (two shards are on disk): one
    sentence naming the shards kept and --resume, exit 143 (128 + SIGTERM, as a shell reports a
    kill), no traceback; the same command with --resume reuses them and finishes."""
    data = write_image_folder(tmp_path / "data", classes=("",), per_class=240, size=32, split_dirs=("",))
    out = tmp_path / "out"
    argv = [sys.executable, os.path.join(ROOT, "main_curate.py"), data, *NET, "-b", "8", "-p", "1",
            "--shard-size", "16", "--findings", "duplicates", "--output-dir", str(out)]
    proc = subprocess.Popen(argv, cwd=ROOT, env=clean_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_line(proc, "features train shard 3/15")
        proc.send_signal(signal.SIGTERM)
        code, err = proc.wait(timeout=CHILD_WAIT_S), proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    shards = len([n for n in os.listdir(out / "embeddings") if n.endswith(".pt")])
    assert code == 128 + signal.SIGTERM and 2 <= shards < 15, (code, err)
    assert err.strip() == (f"main_curate.py: stopped by SIGTERM; the {shards} embedding shard(s) written so far are "
                           f"kept in {out / 'embeddings'}/: run the same command with --resume to continue from them")
    assert not os.path.exists(out / "run.lock")  # the lock went with the run

    done = subprocess.run(argv + ["--resume"], cwd=ROOT, env=clean_env(), text=True, capture_output=True,
                          timeout=CHILD_WAIT_S)
    assert done.returncode == 0, done.stderr
    assert f"{shards} of 15 embedding shard(s) reused" in done.stdout and os.path.isfile(out / "report.html")


# ---------------------------------------------------------------- hostile inputs

@pytest.fixture
def write_guard(monkeypatch):
    """guard(folder): from then on any attempt to create, write, rename or delete under `folder`
    raises PermissionError (as a read-only mount would, also for root, who ignores mode bits)
    and is recorded in the list returned."""
    attempts = []

    def guard(folder):
        root = os.path.realpath(folder) + os.sep
        for dp, dirs, files in list(os.walk(folder))[::-1]:  # the mode bits too, for whoever is not root
            for f in files:
                os.chmod(os.path.join(dp, f), 0o444)
            os.chmod(dp, 0o555)

        def inside(path) -> bool:
            return isinstance(path, (str, bytes, os.PathLike)) and os.path.realpath(os.fsdecode(path)).startswith(root)

        def refuse(name, path):
            attempts.append((name, str(path)))
            raise PermissionError(13, "Read-only file system", str(path))

        real_open, real_os_open = builtins.open, os.open

        def guarded_open(file, mode="r", *args, **kwargs):
            if inside(file) and any(c in mode for c in "wax+"):
                refuse("open", file)
            return real_open(file, mode, *args, **kwargs)

        def guarded_os_open(path, flags, *args, **kwargs):
            if inside(path) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC):
                refuse("os.open", path)
            return real_os_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", guarded_open)
        monkeypatch.setattr(os, "open", guarded_os_open)
        for name in ("mkdir", "remove", "unlink", "rmdir", "rename", "replace", "utime"):
            real = getattr(os, name)

            def guarded(path, *args, _real=real, _name=name, **kwargs):
                if inside(path) or (args and inside(args[0])):
                    refuse(_name, path)
                return _real(path, *args, **kwargs)
            monkeypatch.setattr(os, name, guarded)
        return attempts
    yield guard


def stat_tree(folder) -> dict:
    return {os.path.relpath(os.path.join(dp, n), folder): os.stat(os.path.join(dp, n)).st_mtime_ns
            for dp, dirs, files in os.walk(folder) for n in dirs + files}


@pytest.mark.slow
def test_read_only_data_is_curated_and_left_untouched(labelled_and_pool, tmp_path, capsys, write_guard):
    data, pool = labelled_and_pool
    before = {d: (tree(d), stat_tree(d)) for d in (data, pool)}
    attempts = write_guard(data)
    pool_attempts = write_guard(pool)
    with pytest.raises(PermissionError):  # the guard works
        open(os.path.join(data, "a", "new.png"), "wb")
    assert attempts == [("open", os.path.join(data, "a", "new.png"))]
    attempts.clear()
    try:
        run_inline(capsys, main_curate.main, [data, *CURATE, "--unlabelled", pool, "--select", "2", "--write-clean-csv",
                                              "--clean-drop", "duplicates", "outliers", "labels",
                                              "--output-dir", str(tmp_path / "out")])
    finally:
        for d in (data, pool):
            for dp, _, _ in os.walk(d):
                os.chmod(dp, 0o755)
    assert attempts == pool_attempts == [] and {d: (tree(d), stat_tree(d)) for d in (data, pool)} == before
    assert os.path.isfile(tmp_path / "out" / "report.html")


@pytest.mark.slow
def test_an_output_folder_inside_data_is_refused_before_anything_is_written(labelled_and_pool, tmp_path, capsys):
    """Refused rather than skipped when reading: its thumbnails/ and grids/ would be a class
    folder of PNGs to the next run (and to main_knn.py or a training script given the same DATA),
    and a folder of images is never written to."""
    data, pool = labelled_and_pool
    before = stat_tree(tmp_path)
    for flags, where in (([os.path.join(data, "curate")], "inside DATA"),
                         ([data], "inside DATA"),
                         ([os.path.join(pool, "sub", "out"), "--unlabelled", pool], "inside --unlabelled")):
        msg = one_sentence(run_inline(capsys, main_curate.main, [data, *CURATE, "--output-dir", *flags], check=False))
        assert where in msg and "would read its grids and thumbnails as images" in msg
    assert stat_tree(tmp_path) == before


@pytest.mark.slow
@pytest.mark.parametrize("images, error", [(0, "holds no images and no class folders"),
                                           (1, "found 1 image; curating needs at least 2")])
def test_an_empty_folder_and_one_image_are_one_sentence(tmp_path, capsys, images, error):
    data = tmp_path / "data"
    data.mkdir()
    if images:
        write_image_folder(data, classes=("",), per_class=images, size=32, split_dirs=("",))
    assert error in one_sentence(run_inline(capsys, main_curate.main, [str(data), *CURATE, "--output-dir",
                                                                       str(tmp_path / "out")], check=False))
    assert os.listdir(tmp_path / "out") == []


@pytest.mark.slow
def test_a_csv_manifest_with_unlabelled_rows_is_curated_into_manifests(labelled_and_pool, tmp_path, capsys):
    """--dataset csv: labelled rows are checked, the empty-label rows get suggestions and are
    what --select picks from; select.csv and the clean csv read back as manifests; the csv's
    folder may hold the output folder (it is not scanned)."""
    from common.data.images import csv_manifest
    data, _ = labelled_and_pool
    with open(os.path.join(data, "train.csv"), "w") as f:
        f.write("path,label\n" + "".join(f"{c}/{i}.png,{c if i < 4 else ''}\n" for c in "ab" for i in range(6)))
    out = os.path.join(data, "curated")
    ran = run_inline(capsys, main_curate.main, [data, "--dataset", "csv", *CURATE, "--select", "2",
                                                "--write-clean-csv", "--output-dir", out])
    assert "12 images (12 train)" in ran.stdout
    assert len(csv_manifest(os.path.join(out, "label_suggestions.csv"))) == 4
    picked = csv_manifest(os.path.join(out, "select.csv"))
    assert len(picked) == 2 and set(picked.targets) == {-1}
    clean = csv_manifest(os.path.join(out, "clean_train.csv"))
    assert sorted(clean.classes) == ["a", "b"] and sum(t < 0 for t in clean.targets) <= 4
    # a label edited in DATA (here: taken back) is judged as it is now on a --resume into the same
    # folder: the embedding shards are reused, but labels are read from the csv, never the cache
    with open(os.path.join(data, "train.csv"), "w") as f:
        f.write("path,label\n" + "".join(f"{c}/{i}.png,{c if i < 4 and (c, i) != ('a', 0) else ''}\n"
                                         for c in "ab" for i in range(6)))
    ran = run_inline(capsys, main_curate.main, [data, "--dataset", "csv", *CURATE, "--select", "2",
                                                "--write-clean-csv", "--output-dir", out, "--resume"])
    assert "1 of 1 embedding shard(s) reused" in ran.stdout
    suggested = csv_manifest(os.path.join(out, "label_suggestions.csv"))
    assert len(suggested) == 5 and any(p.endswith("a/0.png") for p, _ in suggested.samples)
