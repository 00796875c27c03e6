"""What proves and measures blocktune: synthetic models, the reference trainer, golden files, benchmarks."""
