"""The incremental detokenizer against `tokenizer.decode(all_ids)`, its stop strings and hold-back,
and the one stop path through the engine (per-token cost flat over a 4,000-token output)."""
from __future__ import annotations

import json
import shutil
import statistics
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models

from afdserve.engine.detokenizer import IncrementalDetokenizer
from afdserve.engine.engine import DEFAULT_MODEL_DIR
from afdserve.tokenizer import Tokenizer

ALPHABET = "ab ,.\né中文🙂"


def _sentencepiece_style(decoder) -> Tokenizer:
    """A word-start-marker vocabulary with byte-fallback tokens: merge-sensitive decoding (the
    marker becomes a space except at the start) and multi-byte characters split over tokens."""
    vocab = {f"<0x{b:02X}>": b for b in range(256)}
    for word in ["▁", "▁a", "▁b", "a", "b", "ab", "▁ab", ",", ".", "é", "中", "▁中", "▁é"]:
        vocab[word] = len(vocab)
    tok = HFTokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True))
    tok.decoder = decoder
    tok.add_special_tokens(["<s>", "</s>"])
    return Tokenizer(tok, {})


TOKENIZERS = {
    "byte-level (default model)": Tokenizer.load(DEFAULT_MODEL_DIR),
    "byte-fallback + strip": _sentencepiece_style(decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)])),
    "metaspace": _sentencepiece_style(decoders.Metaspace()),
}


def _char_ids(tok: Tokenizer) -> list[list[int]]:
    """Id sequences of single characters (multi-byte ones included) as the tokenizer spells them."""
    out = []
    for ch in ALPHABET:
        ids = tok._tok.encode(ch, add_special_tokens=False).ids
        if ids and tok.decode(ids).strip() == ch.strip():
            out.append(ids)
    utf8 = [[tok._tok.token_to_id(f"<0x{b:02X}>")] for b in "🙂中".encode()]
    return out + ([u for u in utf8 if u[0] is not None])


def _id_lists(tok: Tokenizer):
    """Random ids (invalid byte runs and special tokens included) mixed with whole characters."""
    piece = st.one_of(st.lists(st.integers(0, tok.vocab_size - 1), min_size=1, max_size=3),
                      st.sampled_from(_char_ids(tok)))
    return st.lists(piece, max_size=25).map(lambda ps: [i for p in ps for i in p])


def _feed(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    """Add ids until a stop string; the streamed text after each token."""
    shown = []
    for t in ids:
        stopped = detok.add(t)
        shown.append(detok.output_text(finished=stopped is not None))
        if stopped:
            break
    return shown


@pytest.mark.parametrize("name", TOKENIZERS)
def test_matches_decode_of_all_ids(name):
    tok = TOKENIZERS[name]

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(_id_lists(tok))
    def check(ids):
        detok = IncrementalDetokenizer(tok)
        full = tok.decode(ids)
        for k, t in enumerate(ids, 1):
            detok.add(t)
            prefix = tok.decode(ids[:k])
            assert full.startswith(detok.text)          # never emits text it must take back
            last_text_id = next((i for i in reversed(ids[:k]) if i not in tok.special_ids), None)
            if not prefix.endswith("\ufffd") and last_text_id not in tok.byte_fallback_ids:
                assert detok.text == prefix             # nor is behind once the text is settled
        assert detok.output_text(finished=True) == full

    check()


@pytest.mark.parametrize("name", TOKENIZERS)
def test_stop_strings_across_token_boundaries(name):
    tok = TOKENIZERS[name]
    alphabet = "ab ,.é中🙂"

    @settings(max_examples=150, deadline=None)
    @given(st.lists(st.sampled_from(_char_ids(tok)), min_size=1, max_size=20),
           st.lists(st.text(alphabet, min_size=1, max_size=4), min_size=1, max_size=3))
    def check(pieces, stops):
        ids = [i for p in pieces for i in p]
        detok = IncrementalDetokenizer(tok, stops)
        shown = _feed(detok, ids)
        # Reference: decode every prefix; the first prefix holding a stop string ends the sequence.
        ref_stop = None
        for k in range(1, len(ids) + 1):
            text = tok.decode(ids[:k])
            hits = [(text.find(s), s) for s in stops if s in text]
            if hits:
                i, ref_stop = min(hits)
                assert detok.num_tokens == k and detok.stop_string == ref_stop
                assert shown[-1] == text[:i]
                break
        if ref_stop is None:
            assert detok.stop_string is None and detok.output_text(True) == tok.decode(ids)
        final = detok.output_text(True)
        for s in shown:   # a stream never shows a stop string's start that then completes
            assert final.startswith(s)

    check()


def test_stop_spanning_tokens_and_hold_back():
    tok = TOKENIZERS["byte-level (default model)"]
    ids = tok._tok.encode("one two: stop here", add_special_tokens=False).ids
    detok = IncrementalDetokenizer(tok, ["two: s", "zzz"])
    shown = _feed(detok, ids)
    assert detok.stop_string == "two: s" and shown[-1] == "one "
    assert "one t" not in shown and all("one ".startswith(s) for s in shown)


def test_min_tokens_and_multi_byte_stop():
    tok = TOKENIZERS["byte-level (default model)"]
    ids = tok._tok.encode("x中x中", add_special_tokens=False).ids      # 中 is three byte tokens
    early = IncrementalDetokenizer(tok, ["中"], min_tokens=len(ids))
    assert _feed(early, ids)[-1] == "x中x"                              # the first 中 came too early
    late = IncrementalDetokenizer(tok, ["中"])
    shown = _feed(late, ids)
    assert late.num_tokens == 4 and shown == ["x", "x", "x", "x"] and late.stop_string == "中"


def test_rejects_empty_stop_string():
    with pytest.raises(ValueError, match="non-empty"):
        IncrementalDetokenizer(TOKENIZERS["metaspace"], ["ok", ""])


# ----------------------------------------------------------------- through the engine
class _CountingTokenizer:
    """The engine's tokenizer, counting the ids every decode call is given."""

    def __init__(self, tok: Tokenizer):
        self._inner, self.ids_decoded = tok, 0

    def decode(self, ids, skip_special_tokens=True):
        self.ids_decoded += len(ids)
        return self._inner.decode(ids, skip_special_tokens)

    def __getattr__(self, name):
        return getattr(self._inner, name)


class _ScriptedExecutor:
    """Answers every step with the next token of a script: the engine's own work, no model."""

    num_workers, num_kv_blocks = 1, 400

    def __init__(self, script: list[int]):
        self.script, self.step_ms, self.decoded_per_token = script, [], []

    def execute(self, steps):
        from afdserve.sampling import Sample
        return [{s.request_id: Sample(self.script[s.start + len(s.token_ids) - self.prompt_len])
                 for s in steps[0].seqs if s.sample is not None}]

    def health(self):
        return None

    def take_lost_workers(self):
        return {}

    def recovery_stats(self):
        return {}

    def trace_summary(self):
        return {}

    traces, pids, local_model = None, {}, None

    def close(self):
        pass


def test_long_output_with_stop_string_has_flat_per_token_cost(monkeypatch, tmp_path):
    """4,000 generated tokens, stop string at the very end: the ids decoded per token and the
    engine's time per token are the same over the last 1,000 tokens as over the first 1,000."""
    from afdserve.engine.engine import EngineArgs, LLMEngine
    from afdserve.sampling import SamplingParams

    base = Tokenizer.load(DEFAULT_MODEL_DIR)
    text = ("the quick brown fox, é and 中文 " * 200)[:3990] + " END."
    script = base._tok.encode(text, add_special_tokens=False).ids
    assert len(script) >= 4000
    executor = _ScriptedExecutor(script)
    monkeypatch.setattr(LLMEngine, "_make_executor", lambda self, cache: executor)
    # The default model's config and tokenizer with a longer context; no weights are loaded.
    config = json.loads((DEFAULT_MODEL_DIR / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "max_position_embedding": 8192}))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEFAULT_MODEL_DIR / name, tmp_path / name)
    engine = LLMEngine(EngineArgs(model=tmp_path, block_size=16, max_model_len=8192))
    engine.tokenizer = counting = _CountingTokenizer(base)
    executor.prompt_len = 1
    engine.add_request("r", [5], SamplingParams(max_tokens=len(script), stop=["END"], ignore_eos=True))
    decoded, step_s = [], []
    while engine.has_unfinished_requests():
        before, t0 = counting.ids_decoded, time.perf_counter()
        outs = engine.step()
        step_s.append(time.perf_counter() - t0)
        decoded.append(counting.ids_decoded - before)
    out = outs[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == "END" and out.text == text[:text.index("END")]
    n = len(decoded)
    assert n == len(script) - 1                            # finished on the token completing "END"
    first, last = sum(decoded[:1000]), sum(decoded[n - 1000:])
    # Bounded window: a handful of ids per token (a whole-output decode would be ~3,500 per token).
    assert last <= 8 * 1000 and last <= 1.5 * first, (first, last)
    t_first, t_last = statistics.median(step_s[:1000]), statistics.median(step_s[n - 1000:])
    assert t_last <= 2.5 * t_first, (t_first, t_last)      # quadratic decoding: ~20x here
