"""A model on this worker's device: NHWC with --channels-last, the networks compiled with
--compile, wrapped in DistributedDataParallel when distributed."""
import argparse
from typing import Sequence

import torch
import torch.nn as nn

from common.distributed.collectives import DistEnv


def place_model(model: nn.Module, env: DistEnv, args: argparse.Namespace,
                networks: Sequence[nn.Module] = ()) -> nn.Module:
    """Move to this worker's device (NHWC with --channels-last), torch.compile the
    `networks` with --compile, and wrap in DDP when distributed.

    Only the networks are compiled, each in place (nn.Module.compile keeps the state_dict
    keys, so checkpoints keep their contract); the method's glue around them (queue,
    momentum update, gathers, shuffle BN) stays eager, where it is cheap and graph breaks
    would buy nothing."""
    model.to(env.device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.compile:
        for net in networks:
            net.compile(backend=args.compile_backend)
    if env.distributed:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[env.device.index] if env.device.type == "cuda" else None)
    return model
