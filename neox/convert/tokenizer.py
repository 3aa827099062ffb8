"""The model's tokenizer: one `tokenizers.Tokenizer` for generation and evaluation, saved for Hugging Face
as a `PreTrainedTokenizerFast` (tokenizer.json + tokenizer_config.json) so `AutoTokenizer` loads it."""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional

from neox.data.tokenizer import EOD_TOKEN, load_tokenizer
from neox.errors import DataError

if TYPE_CHECKING:
    from tokenizers import Tokenizer


@dataclass
class ModelTokenizer:
    tok: "Tokenizer"
    eod_id: int
    source: str

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    @property
    def eod_token(self) -> str:
        return self.tok.id_to_token(self.eod_id)

    def encode(self, text: str) -> List[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: List[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def save_hf(self, out_dir: Path, max_length: int) -> None:
        """tokenizer.json and tokenizer_config.json for `AutoTokenizer.from_pretrained`."""
        from transformers import PreTrainedTokenizerFast

        eod = self.eod_token
        fast = PreTrainedTokenizerFast(tokenizer_object=self.tok, eos_token=eod, bos_token=eod, unk_token=None,
                                       clean_up_tokenization_spaces=False, model_max_length=max_length)
        fast.save_pretrained(str(out_dir))
        # transformers 5 writes its own class name (TokenizersBackend); the class every version knows loads it too
        path = Path(out_dir) / "tokenizer_config.json"
        config = json.loads(path.read_text())
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        path.write_text(json.dumps(config, indent=2) + "\n")


def load_model_tokenizer(spec: Optional[str], origin: str, eod_token: Optional[str] = None) -> ModelTokenizer:
    """A tokenizer.json path (or a directory holding one, or "bytes"); DataError when there is none.
    `eod_token` names the end-of-document token where the tokenizer's source says (else the usual ones)."""
    if not spec:
        raise DataError(f"no tokenizer found for {origin}; pass --tokenizer <tokenizer.json> (the one its data "
                        "was prepared with)")
    from tokenizers import Tokenizer

    t = load_tokenizer(spec, eod_token)  # DataError for a missing or malformed file, or one without an EOD token
    if spec == "bytes":
        with tempfile.TemporaryDirectory() as tmp:
            t.save(Path(tmp) / "tokenizer.json")
            tok = Tokenizer.from_file(str(Path(tmp) / "tokenizer.json"))
    else:
        tok = t.tok
    return ModelTokenizer(tok, t.eod_id, spec)


__all__ = ["EOD_TOKEN", "ModelTokenizer", "load_model_tokenizer"]
