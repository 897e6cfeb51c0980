"""Text in and out: an HF `tokenizers` tokenizer.json, when the checkpoint folder has one."""
from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer


class Tokenizer:
    def __init__(self, tok: _HFTokenizer, config: dict):
        self._tok = tok
        self.config = config
        self.chat_template: str | None = config.get("chat_template")
        self.bos_token: str | None = _token_str(config.get("bos_token"))
        self.eos_token: str | None = _token_str(config.get("eos_token"))
        self.add_bos = bool(config.get("add_bos_token", False))
        self.bos_token_id = tok.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_token_id = tok.token_to_id(self.eos_token) if self.eos_token else None
        self.special_ids = frozenset(i for i, t in tok.get_added_tokens_decoder().items() if t.special)
        """Ids that `decode` drops (skip_special_tokens=True)."""
        self.byte_fallback_ids = _byte_fallback_ids(tok)
        """Ids of byte tokens ("<0xE4>") whose text depends on the byte tokens after them: a
        ByteFallback decoder turns a whole run of them into U+FFFD when the run is not UTF-8."""

    @classmethod
    def load(cls, model_dir: str | Path) -> "Tokenizer | None":
        """The folder's tokenizer, or None when it has no tokenizer.json (token ids only)."""
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            return None
        try:
            tok = _HFTokenizer.from_file(str(path))
        except Exception as exc:
            raise ValueError(f"cannot load {path}: {exc}") from None
        cfg_path = model_dir / "tokenizer_config.json"
        config = {}
        if cfg_path.is_file():
            try:
                config = json.loads(cfg_path.read_text())
            except json.JSONDecodeError as exc:
                raise ValueError(f"{cfg_path} is not valid JSON: {exc}") from None
        return cls(tok, config)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_str(self, token_id: int) -> str:
        return self._tok.decode([token_id], skip_special_tokens=False)


def _token_str(value) -> str | None:
    if isinstance(value, dict):  # {"content": "<s>", ...} form
        return value.get("content")
    return value


def _byte_fallback_ids(tok: _HFTokenizer) -> frozenset[int]:
    decoder = json.loads(tok.to_str()).get("decoder") or {}
    if "ByteFallback" not in json.dumps(decoder):
        return frozenset()
    ids = (tok.token_to_id(f"<0x{b:02X}>") for b in range(256))
    return frozenset(i for i in ids if i is not None)
