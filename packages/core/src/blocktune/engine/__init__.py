"""The paged engine: a training step unit by unit (forward, chunked loss, backward with RNG replay)
composed of its parts (unit modules, stage link, full fine-tune step, inference) and optimizers."""
