"""Hugging Face interop: `python -m neox.convert to-hf | from-hf`.

    hf         the neox <-> GPTNeoXForCausalLM / LlamaForCausalLM mapping on state dicts
    source     read a neox model from a run, a checkpoint (any layout), a model dir or an HF dir
    export     to-hf: write a transformers directory with the run's tokenizer
    importer   from-hf: write a neox model directory (weights + conf/model YAML + tokenizer)
    init       train.init_from: start a run from a model's weights under any tp/pp layout
"""
