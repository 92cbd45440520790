"""The augmentation applied per sample. When the sampler hands `(index, seed)` keys, each
sample's augmentation is seeded from that key alone, so what a sample looks like does not
depend on the number of loader workers or on where a run was resumed. An unreadable image
stops the run with --strict-data; otherwise training reads the next readable image in its
place (and says which), and evaluation (`skip_unreadable`) leaves it out: the sample is
None, which drop_unreadable_collate removes from the batch, so no feature, label or count
ever belongs to another image."""
import sys
from typing import Callable, List, Optional, Set, Tuple, Union

import torch
from torch.utils.data import Dataset, default_collate

from common.data.images import FileListDataset
from common.data.shard_reader import ShardDataset
from common.data.subsets import SubsetDataset
from common.errors import UserError

READ_ERRORS = (OSError, ValueError, SyntaxError)  # what PIL raises for bad files


def load_sample(dataset: Dataset, index: int, min_side: Optional[int] = None):
    """dataset[index], decoded at reduced size where the source can (image files)."""
    if isinstance(dataset, (FileListDataset, ShardDataset)):
        return dataset.load(index, min_side)
    if isinstance(dataset, SubsetDataset):
        return load_sample(dataset.base, dataset.indices[index], min_side)
    return dataset[index]


class TransformedDataset(Dataset):
    """Applies `transform`; seeds it per sample when the key is `(index, seed)`.
    Unreadable images: stop with `strict`; with `skip_unreadable` (evaluation, export) the
    sample is None (see drop_unreadable_collate); otherwise (training) the next readable
    image stands in. `decode_side`: the shortest side the transform needs, so large JPEGs
    decode at reduced scale (see pil_loader); `read`: how a sample is read (default:
    decoded to a PIL image)."""

    def __init__(self, base: Dataset, transform: Optional[Callable] = None, strict: bool = False,
                 decode_side: Optional[int] = None, read: Callable = load_sample, skip_unreadable: bool = False):
        self.base, self.transform, self.strict, self.decode_side = base, transform, strict, decode_side
        self.read = read  # load_sample, or common.augment.gpu_decode.read_sample (the bytes, for --gpu-decode)
        self.skip_unreadable = skip_unreadable
        # shared across loader workers (torch pickles shared-memory tensors by handle)
        self.skipped = torch.zeros(1, dtype=torch.int64).share_memory_()
        # indices an earlier pass found unreadable (set in the main process by
        # extract_features, so the workers of the next pass inherit it): evaluating every
        # epoch then neither decodes them again nor repeats their warnings
        self.known_unreadable: Set[int] = set()

    def __len__(self) -> int:
        return len(self.base)

    def path(self, index: int) -> str:
        return self.base.path(index) if hasattr(self.base, "path") else str(index)

    def _try_read(self, i: int):
        """The sample, or the exception that made it unreadable (raised with `strict`)."""
        try:
            return self.read(self.base, i, self.decode_side), None
        except READ_ERRORS as e:
            if self.strict:
                raise UserError(f"cannot read image {self.path(i)!r} ({e}); fix or remove the file, "
                                f"or drop --strict-data to skip unreadable images")
            self.skipped += 1
            return None, e

    def _load(self, index: int):
        if self.skip_unreadable:
            if index in self.known_unreadable:
                return None
            sample, error = self._try_read(index)
            if error is not None:
                print(f"warning: leaving out unreadable image {self.path(index)!r} ({error})",
                      file=sys.stderr, flush=True)
            return sample
        failed: List[Tuple[int, Exception]] = []
        for attempt in range(len(self.base)):
            i = (index + attempt) % len(self.base)
            sample, error = self._try_read(i)
            if error is None:
                for j, e in failed:
                    print(f"warning: unreadable image {self.path(j)!r} ({e}); training on {self.path(i)!r} "
                          f"in its place", file=sys.stderr, flush=True)
                return sample
            failed.append((i, error))
        raise UserError("no image in the dataset can be read; check the data folder")

    def __getitem__(self, key: Union[int, Tuple[int, int]]):
        if isinstance(key, (tuple, list)):
            index, seed = key
            sample = self._load(index)
            if sample is None:
                return None
            img, target = sample
            if self.transform is not None:
                # fork_rng keeps the caller's RNG stream untouched (workers=0 shares it)
                with torch.random.fork_rng(devices=[]):
                    # the CPU generator only: torch.manual_seed also queues a lazy CUDA seeding,
                    # which records a Python stack each call (half a millisecond per sample)
                    torch.default_generator.manual_seed(seed)
                    img = self.transform(img)
            return img, target
        sample = self._load(key)
        if sample is None:
            return None
        img, target = sample
        return (self.transform(img) if self.transform is not None else img), target


def drop_unreadable_collate(batch: List):
    """Collate `(index, sample)` pairs whose sample may be None (unreadable, see
    TransformedDataset.skip_unreadable) into (images, targets, kept): `kept` (bool, one per
    pair) marks the pairs whose sample is in the batch; images and targets are None when
    no sample of the batch could be read."""
    kept = torch.tensor([sample is not None for _, sample in batch], dtype=torch.bool)
    samples = [sample for _, sample in batch if sample is not None]
    if not samples:
        return None, None, kept
    images, targets = default_collate(samples)
    return images, targets, kept
