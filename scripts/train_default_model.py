#!/usr/bin/env python
"""Train the embedded default model: a small Step-3 (MFA + MoE) model on checkable synthetic tasks.

    python scripts/train_default_model.py --out afdserve/data/default_model

Plain PyTorch on CPU, one thread by default. Everything is seeded: the batch of step s is drawn
from its own generator seeded with (seed, s), so a run stopped and resumed from the checkpoint in
--workdir continues exactly where it left off and ends with the same weights.

Writes, in --workdir: tokenizer.json, ckpt.pt (model + optimiser + step, every --ckpt-every
steps), loss.jsonl (one JSON object per logged step, with held-out accuracy at eval steps).
Writes, in --out: config.json + model.safetensors (HF Step-3 names), tokenizer.json,
tokenizer_config.json (with the chat template), README.md (the model card).

The training forward is a full-sequence causal forward built from the inference model's own
modules (same weights, same math), so the saved checkpoint runs on afdserve's paged-KV engine.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from afdserve import tasks  # noqa: E402
from afdserve.config import Step3Config  # noqa: E402
from afdserve.model.checkpoint import save_checkpoint  # noqa: E402
from afdserve.model.step3 import Step3ForCausalLM  # noqa: E402


# ------------------------------------------------------------------ tokenizer
def build_tokenizer(path: Path):
    """Byte-level, character-granular tokenizer (no merges): digits and letters are single tokens,
    so arithmetic, reversal and sorting are learnable; the special tokens are ids 0..5."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=256 + len(tasks.SPECIAL_TOKENS), special_tokens=tasks.SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(tasks.corpus_text(5000, seed=0), trainer)
    for i, s in enumerate(tasks.SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return tok


def tokenizer_config() -> dict:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tasks.BOS,
        "eos_token": tasks.EOS,
        "pad_token": tasks.PAD,
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": 256,
        "chat_template": tasks.CHAT_TEMPLATE,
    }


# ------------------------------------------------------------------ model
def make_config(vocab_size: int) -> Step3Config:
    # Step-3's shape in miniature: one KV head shared by every query head, a low-rank query,
    # dense first and last layers, MoE (8 experts, top-2, + a shared expert) in between.
    return Step3Config(
        hidden_size=192, num_hidden_layers=4, num_attention_heads=6, num_attention_groups=1,
        head_dim=32, share_q_dim=96, intermediate_size=512, vocab_size=vocab_size,
        moe_layers_enum=(1, 2), moe_num_experts=8, moe_top_k=2, moe_intermediate_size=128,
        share_expert_dim=128, norm_expert_weight=False, rope_theta=10000.0,
        max_position_embedding=256, bos_token_id=0, eos_token_id=(1,), torch_dtype="float32")


def init_weights(model: Step3ForCausalLM, seed: int) -> None:
    """GPT-2 style: N(0, 0.02), residual-output projections scaled by 1/sqrt(2L), norms at one."""
    gen = torch.Generator().manual_seed(seed)
    L = model.config.num_hidden_layers
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                std = 0.02
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    std /= math.sqrt(2 * L)
                p.normal_(0.0, std, generator=gen)


def train_forward(model: Step3ForCausalLM, ids: torch.Tensor, aux: list | None = None) -> torch.Tensor:
    """Full-sequence causal forward: ids [B, T] -> fp32 logits [B, T, V].

    The inference model's modules with a plain causal SDPA in place of the paged cache; the one
    K/V head is broadcast over the query heads. Router load statistics go to `aux` when given.
    """
    B, T = ids.shape
    c = model.config
    positions = torch.arange(T).repeat(B)
    h = model.embed(ids.reshape(-1))                                       # [B*T, H]
    for layer in model.layers:
        attn = layer.self_attn
        q, k, v = attn.qkv(layer.input_layernorm(h), model.rope, positions)
        q = q.view(B, T, c.num_attention_heads, c.head_dim).transpose(1, 2)   # [B, n_q, T, d]
        k = k.view(B, T, c.num_attention_groups, c.head_dim).transpose(1, 2)  # [B, 1, T, d]
        v = v.view(B, T, c.num_attention_groups, c.head_dim).transpose(1, 2)
        rep = c.num_attention_heads // c.num_attention_groups
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scale)
        h = h + attn.o_proj(o.transpose(1, 2).reshape(B * T, -1))
        inp = layer.ffn_input(h)
        if aux is not None and layer.is_moe:
            probs = torch.softmax(layer.moe.gate(inp.x).float(), -1)          # [N, E]
            load = F.one_hot(inp.ids, c.moe_num_experts).float().sum(1).mean(0) / c.moe_top_k
            aux.append(c.moe_num_experts * (load * probs.mean(0)).sum())
        h = h + layer.ffn_half(inp)
    return model.logits(h).view(B, T, -1)


# ------------------------------------------------------------------ data
def encode_example(tok, ex: tasks.Example, fmt: str, bos: bool) -> tuple[list[int], list[int]]:
    # Prompt and answer are encoded separately, exactly as at inference (prompt encoded, answer generated).
    p = tok.encode(tasks.format_prompt(ex.prompt, fmt, bos), add_special_tokens=False).ids
    a = tok.encode(tasks.format_answer(ex.answer, fmt), add_special_tokens=False).ids
    return p, a


def draw_format(rng: random.Random) -> tuple[str, bool]:
    r = rng.random()
    if r < 0.5:
        return "chat", rng.random() < 0.9      # the template adds <s>; tolerate a client that doesn't
    if r < 0.8:
        return "completion", rng.random() < 0.5
    return "bare", rng.random() < 0.5


def make_batch(tok, step: int, batch_size: int, seed: int, format_per_batch: bool = False,
               task_names: tuple[str, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids [B, T], targets [B, T] with -100 outside the answers) for training step `step`.

    With `format_per_batch`, one prompt format for the whole batch (less padding)."""
    rng = random.Random(seed * 1_000_003 + step)
    seqs, tgts = [], []
    batch_fmt = draw_format(rng)[0] if format_per_batch else None
    for _ in range(batch_size):
        ex = tasks.sample(rng, "train", task_names)
        fmt, bos = draw_format(rng)
        fmt = batch_fmt or fmt
        p, a = encode_example(tok, ex, fmt, bos)
        if bos and fmt == "chat" and rng.random() < 0.05:
            p = [0] + p                          # a doubled <s> (template + add_bos) still works
        seq = p + a
        seqs.append(seq[:-1])
        tgts.append([-100] * (len(p) - 1) + a)
    T = max(map(len, seqs))
    pad = tok.token_to_id(tasks.PAD)
    ids = torch.tensor([s + [pad] * (T - len(s)) for s in seqs])
    tg = torch.tensor([t + [-100] * (T - len(t)) for t in tgts])
    return ids, tg


@torch.no_grad()
def greedy(model, tok, prompt_ids: list[int], max_new: int = 32) -> list[int]:
    ids = list(prompt_ids)
    out = []
    for _ in range(max_new):
        nxt = int(train_forward(model, torch.tensor([ids]))[0, -1].argmax())
        if nxt in model.config.eos_token_id:
            break
        out.append(nxt)
        ids.append(nxt)
    return out


@torch.no_grad()
def evaluate(model, tok, examples: list[tasks.Example], fmt: str = "chat") -> dict:
    model.eval()
    answers = []
    for ex in examples:
        p = tok.encode(tasks.format_prompt(ex.prompt, fmt), add_special_tokens=False).ids
        answers.append(tok.decode(greedy(model, tok, p)))
    model.train()
    return tasks.score(examples, answers)


# ------------------------------------------------------------------ main
def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    frac = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))


EXAMPLES = {"add": ("What is 23 + 45?", "68"), "reverse": ("Reverse the word: apple", "elppa"),
            "sort": ("Sort: 5 2 9", "2 5 9"), "spell": ("Spell out 342", "three hundred forty-two"),
            "upper": ("Uppercase: apple", "APPLE")}


def model_card(args, config: Step3Config, result: dict | None, elapsed: float) -> str:
    n = config.num_parameters()
    lines = [
        "# afdserve default model",
        "",
        "A small model of the Step-3 architecture that afdserve trained itself, from scratch, so the",
        "first `afdserve` command (no `--model`) prints answers you can check.",
        "",
        f"- Architecture: `step3_text` — MFA attention ({config.num_attention_heads} query heads of dim "
        f"{config.head_dim} from a rank-{config.share_q_dim} query,",
        f"  **one** K/V head), {config.num_hidden_layers} layers: dense first and last, MoE in layers "
        f"{', '.join(map(str, config.moe_layers_enum))} ({config.moe_num_experts} routed experts, "
        f"top-{config.moe_top_k},",
        f"  plus a shared expert). Hidden {config.hidden_size}, context {config.max_position_embedding}.",
        f"- Parameters: {n['total'] / 1e6:.2f}M total, {n['active'] / 1e6:.2f}M active per token; fp32 weights.",
        "- Tokenizer: byte-level, one token per character/digit (HF `tokenizers`), specials `<s>` `</s>`",
        "  `<|user|>` `<|assistant|>` `<|system|>` `<pad>`; Jinja chat template in `tokenizer_config.json`.",
        "",
        "## What it knows",
        "",
        f"Synthetic tasks from `afdserve/tasks.py`, each question with one exact answer; this run "
        f"trained on: {', '.join(args.tasks)}.",
        "",
        "| task | example prompt | answer |",
        "|---|---|---|",
        *[f"| {t} | {EXAMPLES[t][0]} | {EXAMPLES[t][1]} |" for t in args.tasks],
        "",
        "Prompt formats it was trained on (all end the answer with `</s>`):",
        "",
        "- chat (the chat template): `<s><|user|>What is 23 + 45?<|assistant|>` -> `68`",
        "- completion: `Q: What is 23 + 45?\\nA:` -> ` 68`",
        "- bare: `What is 23 + 45?` -> ` 68`",
        "",
        "Anything else gets a confident answer to the nearest of these tasks: it is a demo model.",
        "",
        "## Training",
        "",
        "Data: generated on the fly by `afdserve/tasks.py` (no external data). About 10% of all",
        "questions (chosen by hashing the task operands) are held out and never trained on.",
        "",
        "```",
        f"python scripts/train_default_model.py --out afdserve/data/default_model",
        "```",
        "",
        f"{args.steps} steps of AdamW (lr {args.lr}, cosine, batch {args.batch_size}), seed {args.seed},",
        f"one CPU thread; took {elapsed / 60:.0f} minutes on the machine that trained the shipped weights.",
        "",
        "## Score",
        "",
    ]
    if result:
        lines += [f"Held-out exact match during training (chat format, training forward, "
                  f"{result['n']} prompts): **{100 * result['overall']:.1f}%**", "",
                  "| task | accuracy |", "|---|---|"]
        lines += [f"| {t} | {100 * r['accuracy']:.1f}% |" for t, r in result["per_task"].items()]
        lines += [""]
    lines += [
        "Measure it through the serving engine (colocated and disaggregated):",
        "",
        "```",
        "python scripts/eval_default_model.py --n 500",
        "```",
        "",
        "## Licence",
        "",
        "Apache-2.0, like afdserve. The training data is synthetic, generated by afdserve's own code;",
        "the word list in `afdserve/tasks.py` was written for the project.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "afdserve" / "data" / "default_model"),
                    help="where the finished model is written")
    ap.add_argument("--workdir", default="/tmp/afdserve-default-model",
                    help="tokenizer, resumable checkpoint and loss log")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--batch-size", type=int, default=48)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--aux-coef", type=float, default=0.01, help="MoE load-balancing loss weight")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--ckpt-every", type=int, default=100)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--eval-n", type=int, default=60)
    ap.add_argument("--format-per-batch", action=argparse.BooleanOptionalAction, default=False,
                    help="one prompt format per batch (less padding, faster steps)")
    ap.add_argument("--tasks", default=",".join(tasks.SUITE),
                    help=f"comma list of tasks to train and score on (default {','.join(tasks.SUITE)}; "
                         f"all: {','.join(tasks.TASKS)})")
    ap.add_argument("--max-steps-now", type=int, default=None,
                    help="stop (with a checkpoint) after this many steps in this run; resume later")
    args = ap.parse_args(argv)
    args.tasks = tuple(t for t in args.tasks.split(",") if t)
    unknown = [t for t in args.tasks if t not in tasks.TASKS]
    if unknown or not args.tasks:
        ap.error(f"unknown task(s) {unknown}; choose from {', '.join(tasks.TASKS)}")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(work / "tokenizer.json")
    config = make_config(tok.get_vocab_size())
    model = Step3ForCausalLM(config)
    init_weights(model, args.seed)
    model.init_rope()
    model.train()

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-8)

    ckpt_path, log_path = work / "ckpt.pt", work / "loss.jsonl"
    start, elapsed = 0, 0.0
    if ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        if state.get("args_steps") != args.steps or state.get("seed") != args.seed:
            print(f"note: {ckpt_path} was written with different --steps/--seed; resuming anyway")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start, elapsed = state["step"], state.get("elapsed", 0.0)
        print(f"resumed from {ckpt_path} at step {start}")
    elif log_path.exists():
        log_path.unlink()

    def save_ckpt(step: int) -> None:
        tmp = ckpt_path.with_suffix(".tmp")
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                    "elapsed": elapsed, "args_steps": args.steps, "seed": args.seed}, tmp)
        os.replace(tmp, ckpt_path)

    n = config.num_parameters()
    print(f"model: {n['total'] / 1e6:.2f}M parameters ({n['active'] / 1e6:.2f}M active), vocab {config.vocab_size}")
    eval_set = tasks.heldout_set(args.eval_n, seed=4321, tasks=args.tasks)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn
    last_eval = None
    stop_at = args.steps if args.max_steps_now is None else min(args.steps, start + args.max_steps_now)
    with Progress(TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), refresh_per_second=2) as progress, \
            open(log_path, "a") as log:
        bar = progress.add_task("train", total=args.steps, completed=start, info="")
        t_last = time.perf_counter()
        for step in range(start, stop_at):
            lr = lr_at(step, args)
            for g in opt.param_groups:
                g["lr"] = lr
            ids, tg = make_batch(tok, step, args.batch_size, args.seed, args.format_per_batch, args.tasks)
            aux: list = []
            logits = train_forward(model, ids, aux)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tg.reshape(-1), ignore_index=-100)
            aux_loss = torch.stack(aux).mean() if aux else torch.zeros(())
            opt.zero_grad(set_to_none=True)
            (loss + args.aux_coef * aux_loss).backward()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            now = time.perf_counter()
            elapsed += now - t_last
            t_last = now
            done = step + 1
            rec = {"step": done, "loss": round(loss.item(), 5), "aux": round(aux_loss.item(), 4),
                   "lr": round(lr, 7), "grad_norm": round(float(gnorm), 4), "elapsed_s": round(elapsed, 1)}
            if done % args.eval_every == 0 or done == args.steps:
                last_eval = evaluate(model, tok, eval_set)
                t_last = time.perf_counter()   # evaluation time is not training time
                rec["heldout_acc"] = round(last_eval["overall"], 4)
                rec["heldout_per_task"] = {t: round(r["accuracy"], 3) for t, r in last_eval["per_task"].items()}
                progress.console.print(f"step {done}: loss {loss.item():.4f}, held-out exact match "
                                       f"{100 * last_eval['overall']:.1f}% {rec['heldout_per_task']}")
            if done % 10 == 0 or "heldout_acc" in rec:
                log.write(json.dumps(rec) + "\n")
                log.flush()
            progress.update(bar, completed=done, info=f"loss {loss.item():.4f} lr {lr:.2e}")
            if done % args.ckpt_every == 0 or done == stop_at:
                save_ckpt(done)
    if stop_at < args.steps:
        print(f"stopped at step {stop_at} of {args.steps}; run again to resume")
        return 0

    out = Path(args.out)
    model.eval()
    save_checkpoint(model, out, "float32")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n")
    if last_eval is None:
        last_eval = evaluate(model, tok, eval_set)
    final = evaluate(model, tok, tasks.heldout_set(250, seed=99, tasks=args.tasks))
    (out / "README.md").write_text(model_card(args, config, final, elapsed))
    print(f"wrote {out}: held-out exact match {100 * final['overall']:.1f}% "
          f"({ {t: round(r['accuracy'], 3) for t, r in final['per_task'].items()} }), "
          f"{elapsed / 60:.1f} min of training")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
