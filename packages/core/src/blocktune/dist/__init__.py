"""Several processes: data-parallel groups and pipeline stages over torch.distributed."""
