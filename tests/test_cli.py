"""The command line: init-checkpoint, generate, --help everywhere, clean errors."""
import subprocess
import sys

import pytest

from afdserve.cli import build_parser, main


def _run(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "afdserve", *args], capture_output=True, text=True, timeout=120)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def test_init_checkpoint_then_generate_ids(tmp_path):
    out = tmp_path / "ck"
    assert main(["init-checkpoint", "--preset", "tiny", "--out", str(out), "--seed", "3"]) == 0
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    r = _run("generate", "--model", str(out), "--prompt-ids", "5,6,7", "--max-tokens", "4")
    ids = r.stdout.strip().split(",")
    assert len(ids) == 4 and all(i.isdigit() for i in ids)


def test_every_command_has_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert {"generate", "init-checkpoint", "demo", "cost"} <= set(sub.choices)
    for name, p in sub.choices.items():
        assert p.format_help()


@pytest.mark.parametrize("args, message", [
    (["init-checkpoint", "--preset", "huge", "--out", "x"], "unknown preset 'huge'"),
    (["generate", "--model", "/nonexistent", "--prompt-ids", "1"], "model folder not found"),
])
def test_errors_are_one_line(args, message):
    r = _run(*args, check=False)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_bad_prompt_ids(tmp_path, tiny_ckpt):
    r = _run("generate", "--model", str(tiny_ckpt), "--prompt-ids", "1,x", check=False)
    assert r.returncode == 2 and "comma-separated token ids" in r.stderr
