"""What a trained run becomes: Hugging Face / PEFT folders (convert.py: pth_to_hf, merge, split)."""
