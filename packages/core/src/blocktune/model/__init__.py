"""The model: its shape (ModelArgs, presets), the Llama spec every family shares, LoRA."""
