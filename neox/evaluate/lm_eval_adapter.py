"""The `neox` model for lm-evaluation-harness (lm_eval 0.4.x), registered when this module is imported:

    python -m neox.evaluate lm-eval --model neox --model_args checkpoint=runs/x --tasks hellaswag

`checkpoint` is anything neox generates from (a run, a checkpoint of any layout, a from-hf model dir, an
HF dir); other model_args: tokenizer, device, dtype, batch_size, max_length. Scoring follows lm_eval's own
HF model: the context is cut from the left to the context length, log-probabilities are normalized over
the tokenizer's vocabulary (so the padding rows of neox's embedding count for nothing, as in the export),
and an empty context is the end-of-document token.
"""
from __future__ import annotations

import sys
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
import lm_eval.models  # noqa: F401 - registers lm_eval's own models beside ours
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from neox.generate.engine import Generator, load_for_inference
from neox.generate.sampling import SamplingConfig


@register_model("neox")
class NeoxLM(TemplateLM):
    def __init__(self, checkpoint: str, tokenizer: Optional[str] = None, device: Optional[str] = None,
                 dtype: Optional[str] = None, batch_size: int | str = 8, max_length: Optional[int] = None, **_: object):
        super().__init__()
        if device and device.startswith("cuda") and not torch.cuda.is_available():
            # lm_eval's command line asks for cuda unless told otherwise
            print(f"neox: device={device} is not available here; evaluating on cpu", file=sys.stderr, flush=True)
            device = "cpu"
        if str(batch_size).startswith("auto"):  # lm_eval's own sizing probes an HF model; use ours
            batch_size = 8
        model, tok, dev = load_for_inference(checkpoint, tokenizer, device, dtype)
        self.model, self.tok, self.dev = model, tok, dev
        self.generator = Generator(model, tok, dev)
        self.batch_size = int(batch_size)
        self.max_length = int(max_length or model.cfg.seq_len)
        self.vocab = tok.vocab_size

    @property
    def eot_token_id(self) -> int:
        return self.tok.eod_id

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, **kwargs) -> List[int]:
        return self.tok.encode(string)

    def tok_decode(self, tokens: List[int]) -> str:
        return self.tok.decode(tokens)

    # ------------------------------------------------------------------------------------ scoring
    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> List[Tuple[float, bool]]:
        """(sum of log p(continuation | context), whether the continuation is the greedy one) per request."""
        rows = []
        for _, context, continuation in requests:
            whole = (list(context) + list(continuation))[-(self.max_length + 1):]
            rows.append((whole[:-1], len(continuation), whole[len(whole) - len(continuation):]))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths share a batch
        out: List[Optional[Tuple[float, bool]]] = [None] * len(rows)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            width = max(len(rows[i][0]) for i in idx)
            batch = torch.full((len(idx), width), self.eot_token_id, dtype=torch.long)
            for r, i in enumerate(idx):  # right padding: a causal model's earlier positions never see it
                batch[r, : len(rows[i][0])] = torch.tensor(rows[i][0])
            logprobs = F.log_softmax(self.model(batch.to(self.dev))[..., : self.vocab].float(), dim=-1).cpu()
            for r, i in enumerate(idx):
                inp, n, target = rows[i]
                lp = logprobs[r, len(inp) - n: len(inp)]
                target_t = torch.tensor(target)
                greedy = bool((lp.argmax(-1) == target_t).all())
                out[i] = (float(lp.gather(1, target_t[:, None]).sum()), greedy)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        """Log-likelihood of whole texts, in disjoint windows of the context length (as lm_eval's HF model)."""
        out = []
        for (string,) in [r.args for r in requests]:
            windows = [(None, *w) for w in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1))]
            out.append(sum(ll for ll, _ in self._loglikelihood_tokens(windows)))
        return out

    # ------------------------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        out = []
        for context, gen_kwargs in [r.args for r in requests]:
            kw = dict(gen_kwargs or {})
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            new = int(kw.get("max_gen_toks", 256))
            sample = bool(kw.get("do_sample", False)) and float(kw.get("temperature", 1.0)) > 0
            cfg = SamplingConfig(max_new_tokens=new, temperature=float(kw.get("temperature", 1.0)) if sample else 0.0,
                                 top_p=float(kw.get("top_p") or 1.0), top_k=int(kw.get("top_k") or 0), stop=until)
            ids = (self.tok_encode(context) or [self.eot_token_id])[-max(1, self.max_length - new):]
            done, = self.generator.generate([context], cfg, ids=[ids])
            out.append(done.text)
        return out
