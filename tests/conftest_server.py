"""Helpers shared by the server tests (imported, not a pytest conftest).

`make_text_checkpoint(dir)`: the tiny random preset plus a word-level tokenizer whose 512 ids
cover the whole vocabulary (every generated id decodes to a word) and a chat template.
"""
from __future__ import annotations

import json
import socket
from pathlib import Path

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} says {{ m['content'] }} . {% endfor %}"
                 "{% if add_generation_prompt %}assistant says{% endif %}")

WORDS = ("the a an of to and in is it you that he was for on are with as i his they be at one have "
         "this from or had by hot word but what some we can out other were all there when up use your "
         "how said each she which do their time if will way about many then them write would like so "
         "these her long make thing see him two has look more day could go come did number sound no "
         "most people my over know water than call first who may down side been now find hello world "
         "user system assistant says").split()


def make_text_checkpoint(out_dir: str | Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    from afdserve.config import get_preset
    from afdserve.model.checkpoint import init_checkpoint

    config = get_preset("tiny")
    path = init_checkpoint(config, out_dir, seed=0)
    words = ["<s>", "</s>", "<unk>"] + list(dict.fromkeys(WORDS))
    words += [f"w{i}" for i in range(config.vocab_size - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(Path(path) / "tokenizer.json"))
    (Path(path) / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "add_bos_token": False, "chat_template": CHAT_TEMPLATE}))
    return Path(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
