"""`LLM(afd=...)` from any entry point: the README's Python example with afd="2A1F", run as a
script without a main guard (`python file.py`) and as `python -c`. Workers are fresh interpreters
of `afdserve worker`, so the caller's main module is never imported again (with multiprocessing's
spawn, such a script failed with "attention worker 0 exited during start-up")."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from afdserve.engine.llm import LLM
from afdserve.sampling import SamplingParams

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_example(model: Path) -> str:
    """The README's first Python example, pointed at `model` and switched to afd="2A1F"."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    code = next((b for b in blocks if "LLM(" in b), None)
    assert code is not None, "README.md has no Python example with LLM(...)"
    code, n = re.subn(r"LLM\(model=\"[^\"]*\"", f"LLM(model={str(model)!r}, afd=\"2A1F\"", code)
    assert n == 1, "the README example's LLM(model=...) call changed shape"
    assert "__main__" not in code
    return code


def _tokens(stdout: str) -> list[int]:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("[")]
    assert lines, stdout
    return ast.literal_eval(lines[-1])


@pytest.fixture(scope="module")
def expected(tiny_ckpt):
    # Colocated, in the dtype the README example gets (the default, auto): 2A1F has one FFN
    # worker, so its tokens equal colocated ones in bf16 as in fp32.
    with LLM(model=str(tiny_ckpt)) as llm:
        outs = llm.generate([[1, 2, 3], [4, 5]], SamplingParams(temperature=0.0, max_tokens=16))
    return outs[0].outputs[0].token_ids


@pytest.mark.parametrize("how", ["file", "-c"])
def test_readme_example_runs_without_a_main_guard(tiny_ckpt, expected, tmp_path, how):
    code = readme_example(tiny_ckpt)
    if how == "file":
        script = tmp_path / "example.py"
        script.write_text(code)
        cmd = [sys.executable, str(script)]
    else:
        cmd = [sys.executable, "-c", code]
    run = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert _tokens(run.stdout) == expected
