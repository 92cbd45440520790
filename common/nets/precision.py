"""`--amp`, `--amp-dtype`, `--channels-last`: how every script computes, in one place, so
training and evaluation (probe validation, kNN features) always use the same autocast. It sits
in common/nets/, below both common/train/ and common/eval/, so that neither imports the other for it."""
import argparse
import contextlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Precision:
    amp: bool = False
    dtype: torch.dtype = torch.bfloat16  # autocast dtype under --amp
    channels_last: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "Precision":
        return cls(args.amp, torch.float16 if args.amp_dtype == "fp16" else torch.bfloat16, args.channels_last)

    def autocast(self, device: torch.device):
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)

    def scaler(self, device: torch.device) -> torch.amp.GradScaler:
        # only fp16 needs loss scaling; bf16 has fp32's range
        return torch.amp.GradScaler(device.type, enabled=self.amp and self.dtype == torch.float16
                                    and device.type == "cuda")

    def images(self, images: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A loader batch on `device`, NHWC with --channels-last."""
        images = images.to(device, non_blocking=True)
        return images.to(memory_format=torch.channels_last) if self.channels_last else images
