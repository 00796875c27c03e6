"""A training run: its settings, the trainer, data, records, report and generation."""
