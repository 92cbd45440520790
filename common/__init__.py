"""What at least two scripts share, one job per module: process start and collectives,
data and augmentation building blocks, checkpoints, precision, logging. A method's own
pieces (its model, loss, augmentation recipe, optimizer) live next to it: moco/, simclr/."""
