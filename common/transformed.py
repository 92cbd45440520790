"""The augmentation applied per sample. When the sampler hands `(index, seed)` keys, each
sample's augmentation is seeded from that key alone, so what a sample looks like does not
depend on the number of loader workers or on where a run was resumed. Unreadable images
are skipped with a warning (or stop the run with --strict-data)."""
import sys
from typing import Callable, Optional, Tuple, Union

import torch
from torch.utils.data import Dataset

from common.errors import UserError
from common.images import FileListDataset
from common.subsets import SubsetDataset


def load_sample(dataset: Dataset, index: int, min_side: Optional[int] = None):
    """dataset[index], decoded at reduced size where the source can (image files)."""
    if isinstance(dataset, FileListDataset):
        return dataset.load(index, min_side)
    if isinstance(dataset, SubsetDataset):
        return load_sample(dataset.base, dataset.indices[index], min_side)
    return dataset[index]


class TransformedDataset(Dataset):
    """Applies `transform`; seeds it per sample when the key is `(index, seed)`;
    skips unreadable images (or stops, with `strict`). `decode_side`: the shortest side
    the transform needs, so large JPEGs decode at reduced scale (see pil_loader); `read`:
    how a sample is read (default: decoded to a PIL image)."""

    def __init__(self, base: Dataset, transform: Optional[Callable] = None, strict: bool = False,
                 decode_side: Optional[int] = None, read: Callable = load_sample):
        self.base, self.transform, self.strict, self.decode_side = base, transform, strict, decode_side
        self.read = read  # load_sample, or common.gpu_decode.read_sample (the bytes, for --gpu-decode)
        # shared across loader workers (torch pickles shared-memory tensors by handle)
        self.skipped = torch.zeros(1, dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return len(self.base)

    def _load(self, index: int):
        for attempt in range(len(self.base)):
            i = (index + attempt) % len(self.base)
            try:
                return self.read(self.base, i, self.decode_side)
            except (OSError, ValueError, SyntaxError) as e:  # PIL raises these for bad files
                path = self.base.path(i) if hasattr(self.base, "path") else str(i)
                if self.strict:
                    raise UserError(f"cannot read image {path!r} ({e}); fix or remove the file, "
                                    f"or drop --strict-data to skip unreadable images")
                self.skipped += 1
                print(f"warning: skipping unreadable image {path!r} ({e})", file=sys.stderr, flush=True)
        raise UserError("no image in the dataset can be read; check the data folder")

    def __getitem__(self, key: Union[int, Tuple[int, int]]):
        if isinstance(key, (tuple, list)):
            index, seed = key
            img, target = self._load(index)
            if self.transform is not None:
                # fork_rng keeps the caller's RNG stream untouched (workers=0 shares it)
                with torch.random.fork_rng(devices=[]):
                    # the CPU generator only: torch.manual_seed also queues a lazy CUDA seeding,
                    # which records a Python stack each call (half a millisecond per sample)
                    torch.default_generator.manual_seed(seed)
                    img = self.transform(img)
            return img, target
        img, target = self._load(key)
        return (self.transform(img) if self.transform is not None else img), target
