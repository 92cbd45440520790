"""Exporting a checkpoint's backbone: the code export_backbone.py and the pretraining runs'
--export-at-end share (the pretraining scripts call export_at_end after their epoch loop)."""
