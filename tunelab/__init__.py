"""tunelab: fine-tune large language models (full, LoRA, QLoRA) from a config file."""

__version__ = "0.1.0"
