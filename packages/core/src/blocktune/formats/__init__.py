"""Files from other tools, read and written: HF names, blocktune's adapter file, PEFT's adapter folder, tokenizers, chat templates."""
