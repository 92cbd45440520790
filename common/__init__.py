"""What at least two scripts share, one job per module: process start and collectives,
data and augmentation building blocks, checkpoints, precision, logging. A method's own
pieces (its model, loss, augmentation recipe) live next to it: moco/, simclr/; what a second
method needs too (an optimizer, the EMA update, a schedule) comes down here.

Imports only go down (tests/test_layers.py keeps it so): scripts -> method and job folders
(none importing another) -> common/'s folders, lowest first errors, extras, files,
distributed, data, augment, nets, log, ckpt, cli, watch, eval, train."""
