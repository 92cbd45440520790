"""The cached ImageFolder listing (common/data/listing.py): the same samples and classes in the
same order with and without the cache; a file added or removed or a class folder added is
seen; a corrupt cache file is a rescan; nothing is written into the data folder."""
import os
import time

import pytest

from common.data import images, listing


def _touch(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    open(path, "wb").close()  # the listing reads names only: empty files are fine


def _make(root):
    for c in ("b", "a"):
        for i in range(3):
            _touch(os.path.join(root, c, f"{i}.jpg"))
    _touch(os.path.join(root, "a", "nested", "deep.png"))
    _touch(os.path.join(root, "a", "notes.txt"))  # not an image
    _touch(os.path.join(root, "loose.jpg"))  # unlabelled, beside the class folders
    return root


def _age(root, seconds_ago):
    """Every folder's mtime set well before now (a folder just written is never cached)."""
    t = time.time() - seconds_ago
    for dirpath, _, _ in os.walk(root):
        os.utime(dirpath, (t, t))


def _snapshot(root):
    out = {}
    for dirpath, dirs, names in os.walk(root):
        for n in dirs + names:
            st = os.lstat(os.path.join(dirpath, n))
            out[os.path.join(dirpath, n)] = (st.st_mtime_ns, st.st_size)
    return out


def _list(root, capsys):
    ds = images.image_folder(root)
    return (ds.samples, ds.classes), capsys.readouterr().out


def _uncached(root):
    found = images._scan(root, time.time())
    return found.samples, found.classes


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.delenv("SSL_PRETRAIN_LISTINGS", raising=False)  # conftest's temp folder: here the default path
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_the_second_listing_is_read_from_the_cache_and_is_the_same(tmp_path, cache, capsys):
    root = _make(str(tmp_path / "data"))
    _age(root, 100)
    before = _snapshot(root)
    first, out = _list(root, capsys)
    assert "listing read from" not in out and "unlabelled" in out
    assert os.path.isfile(listing.cache_path(root)) and str(cache) in listing.cache_path(root)
    second, out = _list(root, capsys)
    assert "listing read from" in out and "8 images in 2 class folder(s)" in out, out
    assert "the 1 images directly in it are read as unlabelled, beside the 7 images" in out  # said again
    assert second == first == _uncached(root)
    assert first[1] == ["a", "b"] and first[0][0] == (os.path.join(root, "a", "0.jpg"), 0)
    assert first[0][-1] == (os.path.join(root, "loose.jpg"), -1)
    assert [type(p) for p, _ in second[0]] == [str] * 8
    assert _snapshot(root) == before  # the data folder is not written to


def test_a_relative_root_gives_relative_paths_from_the_cache_too(tmp_path, cache, capsys, monkeypatch):
    _make(str(tmp_path / "data"))
    _age(str(tmp_path / "data"), 100)
    monkeypatch.chdir(tmp_path)
    first, _ = _list("data", capsys)
    second, out = _list("data", capsys)
    assert "listing read from" in out and first == second == _uncached("data")
    assert first[0][0][0] == os.path.join("data", "a", "0.jpg")


def test_added_removed_files_and_a_new_class_are_seen(tmp_path, cache, capsys):
    root = _make(str(tmp_path / "data"))
    _age(root, 1000)
    _list(root, capsys)
    _, out = _list(root, capsys)
    assert "listing read from" in out

    _touch(os.path.join(root, "a", "nested", "new.jpg"))
    _age(root, 900)  # another mtime, old enough to be cached
    got, out = _list(root, capsys)
    assert "listing the folder again" in out and "changed since the last listing" in out, out
    assert (os.path.join(root, "a", "nested", "new.jpg"), 0) in got[0] and got == _uncached(root)
    got2, out = _list(root, capsys)
    assert "listing read from" in out and got2 == got

    os.remove(os.path.join(root, "b", "1.jpg"))
    _age(root, 800)
    got, out = _list(root, capsys)
    assert "listing the folder again" in out and os.path.join(root, "b", "1.jpg") not in [p for p, _ in got[0]]
    assert got == _uncached(root)

    _touch(os.path.join(root, "c", "x.jpg"))
    _age(root, 700)
    got, out = _list(root, capsys)
    assert "listing the folder again" in out and got[1] == ["a", "b", "c"]
    assert (os.path.join(root, "c", "x.jpg"), 2) in got[0] and got == _uncached(root)
    got2, out = _list(root, capsys)
    assert "listing read from" in out and got2 == got


def test_a_folder_changed_just_now_is_listed_again_every_time_until_it_is_old(tmp_path, cache, capsys):
    root = _make(str(tmp_path / "data"))
    _age(root, 100)
    _list(root, capsys)
    _touch(os.path.join(root, "b", "fresh.jpg"))  # mtime now: maybe not moved yet for a change in the same tick
    got, out = _list(root, capsys)
    assert "listing the folder again" in out and (os.path.join(root, "b", "fresh.jpg"), 1) in got[0]
    got2, out = _list(root, capsys)
    assert "listing read from" not in out and got2 == got  # not cached while racy


def test_a_corrupt_or_foreign_cache_file_is_a_rescan(tmp_path, cache, capsys):
    root = _make(str(tmp_path / "data"))
    _age(root, 100)
    want, _ = _list(root, capsys)
    path = listing.cache_path(root)
    for junk in (b"{not json", b"\xff\xfe\x00", b"[1, 2]", b'{"version": 999}', b""):
        with open(path, "wb") as f:
            f.write(junk)
        got, out = _list(root, capsys)
        assert got == want and "listing the folder again" in out and "Traceback" not in out, (junk, out)
        got, out = _list(root, capsys)  # rewritten
        assert got == want and "listing read from" in out, junk
    # a cache file of the right version with a field missing or mangled
    import json
    doc = json.load(open(path))
    doc["labels"] = [[0, 1]]
    json.dump(doc, open(path, "w"))
    got, out = _list(root, capsys)
    assert got == want and "inconsistent" in out


def test_the_first_scan_shows_progress(tmp_path, cache, capsys, monkeypatch):
    monkeypatch.setattr(listing, "PROGRESS_EVERY", 3)
    root = _make(str(tmp_path / "data"))
    _list(root, capsys)
    _, out = _list(root, capsys)  # fresh folder: not cached, so scanned again
    assert out.count("files so far") >= 2, out


def test_an_unwritable_cache_folder_still_lists(tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.delenv("SSL_PRETRAIN_LISTINGS", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # a file: the cache folder cannot be made
    root = _make(str(tmp_path / "data"))
    _age(root, 100)
    got, out = _list(root, capsys)
    assert got == _uncached(root) and "cannot be written" in out


def test_a_file_added_behind_a_linked_class_folder_is_seen(tmp_path, cache, capsys):
    root = _make(str(tmp_path / "data"))
    other = tmp_path / "other_disk" / "c"
    _touch(str(other / "0.jpg"))
    os.symlink(str(other), os.path.join(root, "c"))  # class folders are often links to other disks
    _age(root, 100)
    _age(str(tmp_path / "other_disk"), 100)
    first, _ = _list(root, capsys)
    assert first[1] == ["a", "b", "c"]
    _, out = _list(root, capsys)
    assert "listing read from" in out
    _touch(str(other / "1.jpg"))  # the link's parent (root) is unchanged; the target folder is not
    _age(str(tmp_path / "other_disk"), 50)
    got, out = _list(root, capsys)
    assert "listing the folder again" in out and (os.path.join(root, "c", "1.jpg"), 2) in got[0]
    assert got == _uncached(root)


def _write_csv(path, rows, seconds_ago):
    with open(path, "w") as f:
        f.write("path,label\n" + "".join(f"{p},{lab}\n" for p, lab in rows))
    t = time.time() - seconds_ago
    os.utime(path, (t, t))


def test_a_csv_manifest_is_cached_until_it_or_a_listed_folder_changes(tmp_path, cache, capsys):
    from common.errors import UserError
    root = _make(str(tmp_path / "data"))
    rows = [("a/0.jpg", "cat"), ("b/1.jpg", "Cat"), ("a/nested/deep.png", ""), ("loose.jpg", "dog")]
    csv_path = str(tmp_path / "data" / "train.csv")
    _write_csv(csv_path, rows, 100)
    _age(root, 100)
    before = _snapshot(root)

    def read(classes=None):
        ds = images.csv_manifest(csv_path, classes)
        captured = capsys.readouterr()
        return (ds.samples, ds.classes), captured.out, captured.err

    first, out, err = read()
    assert "listing read from" not in out and "differ only in case" in err
    second, out, err = read()
    assert "listing read from" in out and second == first and "differ only in case" in err  # said again
    assert first[1] == ["Cat", "cat", "dog"] and first[0][0] == (os.path.join(root, "a", "0.jpg"), 1)
    val, out, _ = read(classes=["cat", "dog", "Cat"])  # another listing: the training classes given
    assert "listing read from" not in out and val[1] == ["cat", "dog", "Cat"] and val[0][0][1] == 0
    assert read(classes=["cat", "dog", "Cat"])[0] == val and read()[0] == first
    assert _snapshot(root) == before

    _write_csv(csv_path, rows + [("b/2.jpg", "dog")], 50)  # a row added
    got, out, _ = read()
    assert "reading the manifest again" in out and got[0][-1] == (os.path.join(root, "b", "2.jpg"), 2)

    os.remove(os.path.join(root, "a", "0.jpg"))  # a listed file gone: its folder's mtime says so
    _age(root, 40)
    with pytest.raises(UserError, match="do not exist"):
        images.csv_manifest(csv_path)


def test_links_between_class_folders_list_the_same_from_the_cache(tmp_path, cache, capsys):
    root = _make(str(tmp_path / "data"))
    out = tmp_path / "outside"
    _touch(str(out / "o" / "1.jpg"))
    _touch(str(out / "o" / "2.jpg"))
    os.symlink(str(out / "o"), os.path.join(root, "d"))  # a class folder on another disk
    os.symlink(os.path.join(root, "b"), os.path.join(root, "a", "more"))  # a folder link into another class
    os.symlink(os.path.join(root, "b", "0.jpg"), os.path.join(root, "a", "also.jpg"))  # a file link into another
    os.symlink(str(out / "o" / "2.jpg"), os.path.join(root, "b", "tod.jpg"))  # into the linked class d
    os.symlink(str(out / "o" / "1.jpg"), os.path.join(root, "b", "ext.jpg"))  # the same: read once, under d
    os.symlink(root, os.path.join(root, "b", "up"))  # a loop back to DATA
    _age(root, 100)
    _age(str(out), 100)
    first = images.image_folder(root)
    err = capsys.readouterr().err
    assert "3 image link(s)" in err, err
    assert first.classes == ["a", "b", "d"] and len(first.samples) == 4 + 3 + 2 + 1
    second = images.image_folder(root)
    captured = capsys.readouterr()
    assert "listing read from" in captured.out and "3 image link(s)" in captured.err
    assert second.samples == first.samples and second.classes == first.classes
