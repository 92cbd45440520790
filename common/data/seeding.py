"""The augmentation seed of a sample, shared by the folder and the shard orders."""


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """One augmentation seed per (run seed, epoch, sample): independent of workers, ranks and
    where a run was resumed."""
    return ((seed * 1_000_003 + epoch) * 10_000_019 + index) % (2 ** 63)
