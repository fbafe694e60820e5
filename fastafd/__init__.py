"""fastafd: online adversarial knowledge distillation at scale."""

__version__ = "0.1.0"
