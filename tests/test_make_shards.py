"""make_shards.py: an ImageFolder or a csv into WebDataset tar shards, the index, the check,
the refusal to overwrite (docs/shards.md)."""
import hashlib
import json
import os
import tarfile

import pytest
from conftest import write_image_folder

import make_shards
from common.data.shards import check_shards, parse_size, source_digests
from common.errors import UserError


def run(argv, capsys):
    try:
        make_shards.main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_shards(out, split="train"):
    """key -> (image member name, bytes, class text), in the order the tars hold them."""
    samples = {}
    with open(os.path.join(out, f"{split}.index.json")) as f:
        index = json.load(f)
    for shard in index["shards"]:
        with tarfile.open(os.path.join(out, shard["name"])) as tar:
            names = tar.getnames()
            assert len(names) == 2 * shard["samples"]
            for image, cls in zip(names[0::2], names[1::2]):  # members of a sample adjacent
                key = image.split(".")[0]
                assert cls == f"{key}.cls" and key not in samples
                samples[key] = (image, tar.extractfile(image).read(), tar.extractfile(cls).read().decode("ascii"))
    return index, samples


def sha(data):
    return hashlib.sha256(data).hexdigest()


def source_files(root, classes):
    """sha256 -> class index of every image under root/<class>/."""
    out = {}
    for i, c in enumerate(classes):
        for name in os.listdir(os.path.join(root, c)):
            with open(os.path.join(root, c, name), "rb") as f:
                out[sha(f.read())] = i
    return out


def test_an_image_folder_becomes_several_shards_holding_every_sample_once(tmp_path, capsys):
    data = write_image_folder(tmp_path / "data", classes=("a", "b", "c"), per_class=5)
    out = str(tmp_path / "shards")
    code, stdout, err = run([data, out, "--shard-size", "12KB"], capsys)
    assert code == 0, err
    assert "checked" in stdout and "img/s" in stdout and "eta" in stdout
    index, samples = read_shards(out)
    assert len(index["shards"]) >= 3 and max(s["samples"] for s in index["shards"]) > 1
    assert all(s["bytes"] <= 12_000 for s in index["shards"])
    assert sorted(os.listdir(out)) == sorted([s["name"] for s in index["shards"]] + ["train.index.json"])
    assert [s["name"] for s in index["shards"]] == [f"train-{i:06d}.tar" for i in range(len(index["shards"]))]
    for s in index["shards"]:
        assert s["bytes"] == os.path.getsize(os.path.join(out, s["name"]))
    assert index["samples"] == sum(s["samples"] for s in index["shards"]) == len(samples) == 15
    assert index["bytes"] == sum(s["bytes"] for s in index["shards"])
    assert index["classes"] == ["a", "b", "c"] and index["source"] == os.path.abspath(data)
    assert index["order"] == "shuffled" and index["seed"] == 0
    assert sorted(samples) == [f"{i:06d}" for i in range(15)]
    expected = source_files(os.path.join(data, "train"), ["a", "b", "c"])
    got = {sha(data): int(cls) for _, data, cls in samples.values()}
    assert got == expected  # every image once, bytes unchanged, its class
    assert all(name.endswith(".png") for name, _, _ in samples.values())
    # shuffled: the first shard is not one class's images only, as the listing's order would make it
    first = [int(c) for _, _, c in list(samples.values())[:6]]
    assert len(set(first)) > 1


def test_no_shuffle_keeps_the_listing_order_and_a_second_run_is_refused(tmp_path, capsys):
    data = write_image_folder(tmp_path / "data", classes=("a", "b"), per_class=3, split_dirs=("",))
    out = str(tmp_path / "shards")
    assert run([data, out, "--no-shuffle", "--shard-size", "1GB"], capsys)[0] == 0
    index, samples = read_shards(out)
    assert len(index["shards"]) == 1 and index["order"] == "as listed" and index["seed"] is None
    assert [c for _, _, c in samples.values()] == ["0", "0", "0", "1", "1", "1"]
    before = {n: os.path.getmtime(os.path.join(out, n)) for n in os.listdir(out)}
    contents = {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)}
    code, _, err = run([data, out], capsys)
    assert code == 2 and "already holds train shards" in err and "never overwrites" in err
    assert len(err.strip().splitlines()) == 1
    assert {n: os.path.getmtime(os.path.join(out, n)) for n in os.listdir(out)} == before
    assert {n: open(os.path.join(out, n), "rb").read() for n in os.listdir(out)} == contents
    # the other split of the same OUT is not refused: here there is none, said in one sentence
    code, _, err = run([data, out, "--split", "val"], capsys)
    assert code == 2 and "has no val split" in err and len(err.strip().splitlines()) == 1
    # an index alone (shards removed by hand) is refused too
    for s in index["shards"]:
        os.remove(os.path.join(out, s["name"]))
    code, _, err = run([data, out], capsys)
    assert code == 2 and "train.index.json" in err


def test_a_csv_manifest_source(tmp_path, capsys):
    data = write_image_folder(tmp_path / "data", classes=("cat", "dog"), per_class=3, split_dirs=("",))
    rows = ["path,label"] + [f"{c}/{i}.png,{c}" for c in ("dog", "cat") for i in range(3)] + ["cat/0.png,"]
    (tmp_path / "data" / "train.csv").write_text("\n".join(rows) + "\n")
    out = str(tmp_path / "shards")
    code, _, err = run([str(tmp_path / "data" / "train.csv"), out, "--shard-size", "12KB"], capsys)
    assert code == 0, err
    index, samples = read_shards(out)
    assert index["dataset"] == "csv" and index["classes"] == ["cat", "dog"] and index["samples"] == 7
    assert index["unlabelled"] == 1 and len(index["shards"]) > 1
    expected = sorted([(sha(open(os.path.join(data, c, f"{i}.png"), "rb").read()), str(k))
                       for k, c in enumerate(("cat", "dog")) for i in range(3)]
                      + [(sha(open(os.path.join(data, "cat", "0.png"), "rb").read()), "-1")])
    assert sorted((sha(d), c) for _, d, c in samples.values()) == expected


def test_an_empty_or_missing_source_is_one_sentence(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    for data in (str(tmp_path / "empty"), str(tmp_path / "missing")):
        code, _, err = run([data, str(tmp_path / "out")], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "error:" in err
    assert not os.path.exists(tmp_path / "out")  # nothing created for a source that is not there


def _written(tmp_path, capsys):
    data = write_image_folder(tmp_path / "data", classes=("a", "b"), per_class=4)
    out = str(tmp_path / "shards")
    assert run([data, out, "--shard-size", "12KB", "--seed", "3"], capsys)[0] == 0
    with open(os.path.join(out, "train.index.json")) as f:
        index = json.load(f)
    listing = make_shards.source(data, "imagefolder", "train")
    from common.data.shards import order
    ordered = [listing.samples[i] for i in order(len(listing.samples), 3)]
    return out, index, [t for _, t in ordered], source_digests(ordered)


def test_the_check_passes_on_good_shards_and_fails_on_a_truncated_or_changed_one(tmp_path, capsys):
    out, index, labels, digests = _written(tmp_path, capsys)
    assert len(index["shards"]) > 1 and index["shards"][1]["samples"] > 1
    assert check_shards(out, index["shards"], labels, digests) == 8
    path = os.path.join(out, index["shards"][1]["name"])
    original = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(original[:1500])  # cut inside the first image's data
    with pytest.raises(UserError) as e:
        check_shards(out, index["shards"], labels, digests)
    assert path in str(e.value) and "\n" not in str(e.value)
    # one byte of an image changed, size unchanged
    changed = bytearray(original)
    changed[BLOCK_DATA] ^= 0xFF
    with open(path, "wb") as f:
        f.write(bytes(changed))
    with pytest.raises(UserError, match="differ from its source file's"):
        check_shards(out, index["shards"], labels, digests)
    with open(path, "wb") as f:
        f.write(original)
    with pytest.raises(UserError, match="class"):
        check_shards(out, index["shards"], [1 - t for t in labels], digests)
    os.remove(os.path.join(out, index["shards"][-1]["name"]))
    with pytest.raises(UserError):
        check_shards(out, index["shards"], labels, digests)


BLOCK_DATA = 512 + 100  # a byte inside the first member's data (after its 512-byte header)


def test_sizes_parse():
    assert parse_size("1GB") == 10**9 and parse_size("500mb") == 5 * 10**8 and parse_size("4096") == 4096
    assert parse_size("256MiB") == 256 * 2**20 and parse_size("1.5G") == 1_500_000_000
    for bad in ("", "1 XB", "-1GB", "0"):
        with pytest.raises(ValueError):
            parse_size(bad)
    with pytest.raises(SystemExit):
        make_shards.get_args_parser().parse_args(["d", "o", "--shard-size", "lots"])


def test_a_failure_while_writing_leaves_no_shard_behind(tmp_path, capsys, monkeypatch):
    import common.data.shards as shards
    data = write_image_folder(tmp_path / "data", classes=("a", "b"), per_class=4)
    out = str(tmp_path / "shards")
    real, calls = shards._read, []

    def failing(path):
        calls.append(path)
        if len(calls) == 6:  # after a shard or more is written
            raise UserError(f"cannot read {path!r} (planted)")
        return real(path)

    monkeypatch.setattr(shards, "_read", failing)
    code, _, err = run([data, out, "--shard-size", "12KB"], capsys)
    assert code == 2 and "planted" in err and len(err.strip().splitlines()) == 1
    assert os.listdir(out) == []  # neither shards nor temp files nor an index
    monkeypatch.setattr(shards, "_read", real)
    assert run([data, out, "--shard-size", "12KB"], capsys)[0] == 0  # so a rerun is not refused


def test_a_failed_check_writes_no_index(tmp_path, capsys, monkeypatch):
    data = write_image_folder(tmp_path / "data", classes=("a", "b"), per_class=2)
    out = str(tmp_path / "shards")

    def failing(*args, **kwargs):
        raise UserError("shard x fails the check: planted")

    monkeypatch.setattr(make_shards, "check_shards", failing)
    code, _, err = run([data, out], capsys)
    assert code == 2 and "planted; no index was written" in err and len(err.strip().splitlines()) == 1
    assert os.listdir(out) == ["train-000000.tar"]
