"""Meta and Hugging Face checkpoint layouts for blocktune stores, both directions."""
