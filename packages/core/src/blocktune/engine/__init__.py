"""The paged step: forward over units, the block-by-block backward with RNG replay, optimizers."""
