"""--tensorboard: metrics.jsonl's scalars (per epoch), the step loop's loss / lr / data
wait (per progress line) and image grids, as TensorBoard event files in
<output_dir>/tensorboard (rank 0 only). metrics.jsonl stays the record; this is a view."""
import os
from typing import Dict, Optional

import numpy as np

from common.distributed.collectives import is_main_process
from common.extras import require


def _summary_writer() -> type:
    """torch.utils.tensorboard.SummaryWriter, imported only when asked for; a missing or
    broken tensorboard is one sentence, not torch's traceback."""
    require("tensorboard")  # absent: "not installed"
    # tensorboard's own import is lazy: its protobuf modules (where a protobuf version clash
    # raises TypeError) load with torch.utils.tensorboard
    return require("torch.utils.tensorboard", package="tensorboard").SummaryWriter


class TensorBoardLog:
    def __init__(self, output_dir: str, enabled: bool):
        self.writer = None
        if enabled and is_main_process():
            SummaryWriter = _summary_writer()
            self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))

    def scalars(self, values: Dict, step: int, prefix: str) -> None:
        """Every number of `values` as `<prefix>/<name>` at `step`."""
        if self.writer is None:
            return
        for name, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{prefix}/{name}", value, step)
        self.writer.flush()

    def image(self, tag: str, image: np.ndarray, step: int = 0) -> None:
        """An H x W x 3 uint8 image (a PNG grid as written to disk)."""
        if self.writer is None:
            return
        self.writer.add_image(tag, image, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def check_tensorboard_flag(enabled: Optional[bool]) -> None:
    """Before any worker starts: --tensorboard without the package is one sentence."""
    if enabled:
        _summary_writer()
