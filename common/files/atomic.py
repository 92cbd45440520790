"""Writing a file so that readers only ever see the old one or the whole new one: write a
temp file beside it, then rename it into place. Checkpoints (common/ckpt/io.py),
exports (export_backbone.py), figures (common/log/plots.py) and the rewritten metrics log
(common/log/progress.py) all go through here."""
import contextlib
import os
import secrets
import stat
from typing import Iterator, Optional


def create_temp(path: str, prefix: Optional[str] = None, suffix: Optional[str] = None) -> str:
    """Create an empty, new file in `path`'s folder and return its name: by default
    `.<name>.<random>.tmp<ext>`, else `<prefix><random><suffix>`. Its mode is the one a
    plain open() gives (0o666 less the umask): tempfile.mkstemp's 0600 would hide a
    checkpoint or export from the user's group, and asking os.umask() for the mask
    changes it for every thread meanwhile."""
    folder, name = os.path.split(os.path.abspath(path))
    if prefix is None:
        prefix = f".{name}."
    if suffix is None:
        # the real extension last: some writers pick the format from it
        suffix = ".tmp" + os.path.splitext(name)[1]
    while True:
        tmp = os.path.join(folder, f"{prefix}{secrets.token_hex(4)}{suffix}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:  # another writer drew the same name
            continue


@contextlib.contextmanager
def atomic_path(path: str, prefix: Optional[str] = None, suffix: Optional[str] = None) -> Iterator[str]:
    """Yields the name of a new temp file beside `path` (see create_temp) to write; when
    the block ends normally it is flushed to disk and renamed onto `path`, when it raises
    the temp file is removed and `path` is left as it was. The folder must exist."""
    tmp = create_temp(path, prefix, suffix)
    try:
        mode = stat.S_IMODE(os.stat(tmp).st_mode)
        yield tmp
        # exporters such as torch.jit.save and torch.onnx.export replace the file rather
        # than write into it, and the new one has their mode, not the user's
        if stat.S_IMODE(os.stat(tmp).st_mode) != mode:
            os.chmod(tmp, mode)
        # without it a crash soon after the rename can leave `path` empty on ext4/xfs
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:  # already gone, or the folder turned read-only: the original error matters
            pass
        raise
    _fsync_folder(os.path.dirname(os.path.abspath(path)))


def _fsync_folder(folder: str) -> None:
    # the rename itself is durable only once the folder is; best effort, since some
    # systems (and filesystems) cannot open or sync a folder
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json_atomic(path: str, doc: object) -> None:
    """`doc` as indented JSON at `path`, through atomic_path: a reader sees the old file or the new one."""
    import json
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1)
