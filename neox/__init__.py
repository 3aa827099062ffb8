"""neox: train GPT-style language models from a laptop CPU to Slurm clusters."""
__version__ = "0.1.0"
