"""Thin callbacks for training frameworks: ``integrations.lightning`` (PyTorch Lightning) and
``integrations.transformers`` (the Hugging Face ``Trainer``). Each imports its framework; the
core package never does."""
