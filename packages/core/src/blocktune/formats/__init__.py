"""Files from other tools, read and written: Meta's params.json, HF names, blocktune's adapter file, PEFT's adapter folder, tokenizers, chat templates."""
