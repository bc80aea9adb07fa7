"""Grafting maths: base model, task heads, data, fine-tuning, patches, localization and evaluation.

Nothing in this package imports FastAPI, Redis or RQ: the CLI, the server and the workers all share it.
"""
