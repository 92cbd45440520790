"""--cache-teacher's input: the pretraining loader's batches with each image's dataset index
appended to its two views, so the model looks up the teacher's cached feature of that image.
The index is the image actually read (an unreadable one's stand-in gives its own)."""
from typing import Iterator

from common.data.transformed import load_sample
from common.train.data import PretrainData


def read_with_index(dataset, index: int, min_side=None):
    """(image, its index): load_sample with the label replaced (pretraining does not use it)."""
    image, _ = load_sample(dataset, index, min_side)
    return image, index


class _IndexedBatches:
    def __init__(self, loader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        for views, index in self.loader:
            yield [*views, index], index


def with_image_index(data: PretrainData) -> PretrainData:
    """`data` (common.train.data.two_view_data's) whose batches are (view 1, view 2, index):
    the model is called as model(x1, x2, index). Done before the loader's first epoch."""
    data.dataset.read = read_with_index
    to_device = data.to_device
    data.loader = _IndexedBatches(data.loader)
    data.to_device = lambda batch: (*to_device(batch[:-1]), batch[-1].to(to_device.device, non_blocking=True))
    return data
