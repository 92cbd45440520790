"""Plumbing shared by every script: distributed setup, data, augmentation,
checkpoints, logging, metrics and schedules. Nothing method-specific lives here."""
