"""Exporting a checkpoint's backbone: the code export_backbone.py and the pretraining runs'
--export-at-end share (common/train/run.py)."""
