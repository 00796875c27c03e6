"""Files from other tools, read and written: HF names, adapters (blocktune's and PEFT's), tokenizers, chat templates."""
