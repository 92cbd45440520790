"""Knowledge distillation of a frozen teacher into a small backbone (main_distill.py)."""
