"""Evaluation: `python -m neox.evaluate perplexity | lm-eval`.

    perplexity        per-token loss and perplexity on a split of prepared data
    lm_eval_adapter   the `neox` model of lm-evaluation-harness (import it to register the name)
"""
