"""The cached listing of an image folder or a csv manifest (common/data/images.py,
image_folder and csv_manifest): walking a folder of a million images costs seconds to
minutes (much more on a network disk), a csv of a million rows a stat per row, and every
script that reads the data did it again. The listing is kept in a cache folder,
`$XDG_CACHE_HOME/ssl-pretrain/listings/` (default `~/.cache/...`, or `$SSL_PRETRAIN_LISTINGS`), one file per data folder;
the data folder itself is never written to (it is often read-only or shared).

The cache file holds the listing (paths relative to the folder, labels, classes) and the
st_mtime_ns of every folder that was listed (for a csv: the csv itself and every folder
holding a listed file). Adding, removing or renaming a file or a
subfolder changes its parent folder's mtime, so the listing is still right when every folder's
mtime is unchanged: checking costs one stat per folder, not one per file. A folder changed
within RACY_SECONDS of the scan (its mtime may not have moved yet for a change made during
the scan) is not cached. Any doubt (no file, unreadable, another version, a changed mtime) is
a rescan, said in one line. Not seen: a file's contents (not part of the listing), and a link
retargeted outside the data folder; delete the cache file (its path is in the log line) to
force a rescan."""
import hashlib
import json
import os
import time
from typing import Dict, List, Optional, Tuple

from common.distributed.collectives import is_main_process
from common.files.atomic import atomic_path

VERSION = 1
# a scan that finds a folder modified this recently does not write the cache
RACY_SECONDS = 2.0
# the first scan says how far it got every this many files
PROGRESS_EVERY = 100_000
# cache files not used for this long are removed when another is written
PRUNE_DAYS = 30
NO_CACHE = "no cached listing yet"


def log(msg: str) -> None:
    # common.log.progress.log, which common/data may not import (tests/test_layers.py)
    if is_main_process():
        print(msg, flush=True)


CACHE_ENV = "SSL_PRETRAIN_LISTINGS"  # a folder of its own for the listings (the test suite points it at a temp folder)


def cache_dir() -> str:
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "ssl-pretrain", "listings")


def cache_path(key: str, variant: str = "") -> str:
    """The cache file of a data folder or csv manifest `key` (its absolute path is hashed, with
    `variant`: a csv read with the training classes and without them are two listings)."""
    name = os.path.abspath(key) + "\0" + variant
    digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:20]
    return os.path.join(cache_dir(), f"listing-{digest}.json")


def prefix_of(root: str) -> str:
    """The prefix every listed path starts with (os.path.join(root, rel) == prefix + rel)."""
    return os.path.join(root, "")


def mtimes(root: str, prefix: str, watched: List[str]) -> Optional[Dict[str, int]]:
    """st_mtime_ns of each watched path (relative to `prefix`; "" is `root`), None if one is gone."""
    out = {}
    for rel in watched:
        try:
            out[rel] = os.stat(prefix + rel if rel else root).st_mtime_ns
        except OSError:
            return None
    return out


class Listing:
    """What a listing found: samples (path, label) in order, classes, the paths whose mtimes
    vouch for it (folders, a csv file; relative to the prefix), and for image_folder the links
    into another class folder that were not followed and how many images sit loose in the root;
    `warnings` are said again when the listing is read from the cache."""

    def __init__(self, samples: List[Tuple[str, int]], classes: List[str], watched: List[str],
                 elsewhere: Optional[List[str]] = None, loose: int = 0, warnings: Optional[List[str]] = None):
        self.samples, self.classes, self.watched = samples, classes, watched
        self.elsewhere, self.loose, self.warnings = elsewhere or [], loose, warnings or []


def load(key: str, identity: Dict, root: str, prefix: str, variant: str = "") -> Tuple[Optional[Listing], str]:
    """(the cached listing, "") when it is still right, else (None, why not). `identity` (what
    was listed, and how) must match the cache file's exactly."""
    path = cache_path(key, variant)
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except FileNotFoundError:
        return None, NO_CACHE
    except (OSError, ValueError) as e:
        return None, f"cached listing {path} unreadable ({type(e).__name__})"
    try:
        if not isinstance(doc, dict) or any(doc.get(k) != v for k, v in {"version": VERSION, **identity}.items()):
            return None, f"cached listing {path} is of another version or source"
        watched: Dict[str, int] = doc["watched"]
        now = mtimes(root, prefix, list(watched))
        if now is None:
            return None, "a listed folder or file is gone"
        changed = [rel for rel, m in watched.items() if now[rel] != m]
        if changed:
            return None, (f"{len(changed)} folder(s) or file(s) changed since the last listing, e.g. "
                          f"{(prefix + changed[0]) if changed[0] else root!r}")
        rels = doc["paths"].split("\0") if doc["paths"] else []
        labels: List[int] = []
        for label, count in doc["labels"]:
            labels += [int(label)] * int(count)
        if len(labels) != len(rels):
            return None, f"cached listing {path} is inconsistent"
        found = Listing([(prefix + r, t) for r, t in zip(rels, labels)], [str(c) for c in doc["classes"]],
                        list(watched), [prefix + r for r in doc["elsewhere"]], int(doc["loose"]),
                        [str(w) for w in doc["warnings"]])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        return None, f"cached listing {path} unreadable ({type(e).__name__})"
    try:
        os.utime(path)  # used: kept by the pruning
    except OSError:
        pass
    return found, ""


def save(key: str, identity: Dict, root: str, prefix: str, found: Listing, scan_started: float,
         variant: str = "") -> None:
    """Write the listing's cache file atomically; a watched path modified since RACY_SECONDS
    before the scan started, or a cache folder that cannot be written, leaves no cache (said in
    one line for a large listing)."""
    now = mtimes(root, prefix, found.watched)
    if now is None:
        return
    recent = [rel for rel, m in now.items() if m >= (scan_started - RACY_SECONDS) * 1e9]
    if recent:
        if len(found.samples) >= PROGRESS_EVERY:  # a small folder lists fast anyway: no line
            log(f"=> {key}: listing not cached, {(prefix + recent[0]) if recent[0] else root!r} changed during or "
                f"just before the scan")
        return
    n = len(prefix)
    runs: List[List[int]] = []
    for _, t in found.samples:
        if runs and runs[-1][0] == t:
            runs[-1][1] += 1
        else:
            runs.append([t, 1])
    doc = {"version": VERSION, **identity, "scanned_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "watched": now, "classes": found.classes, "loose": found.loose, "warnings": found.warnings,
           "elsewhere": [p[n:] for p in found.elsewhere], "labels": runs,
           # NUL cannot be in a file name: one string splits much faster than a million JSON strings load
           "paths": "\0".join(p[n:] for p, _ in found.samples)}
    path = cache_path(key, variant)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _prune(os.path.dirname(path))
        with atomic_path(path) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(doc, f)
    except OSError as e:
        log(f"=> {key}: listing not cached, {path} cannot be written ({e})")


def _prune(folder: str) -> None:
    old = time.time() - PRUNE_DAYS * 86400
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return
    for e in entries:
        try:
            if e.name.startswith("listing-") and e.stat().st_mtime < old:
                os.remove(e.path)
        except OSError:
            pass
