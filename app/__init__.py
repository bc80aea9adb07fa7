"""skillgraft: one pretrained transformer in memory, many sparse per-task graft patches."""

__version__ = "0.1.0"
