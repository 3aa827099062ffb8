"""Text generation: `python -m neox.generate <model> prompt="..."`.

    sampling          repetition penalty, temperature, top-k, top-p; greedy or a seeded draw
    engine            batched generation over GPT.decode and its KV cache; stop strings and tokens
    tensor_parallel   the same generator with the model sharded over tp processes
"""
from neox.generate.engine import Completion, Generator
from neox.generate.sampling import SamplingConfig

__all__ = ["Completion", "Generator", "SamplingConfig"]
