"""The docs against the code: the README's one-screen example prints exactly what the README
shows under it, examples/quickstart.py trains (held-out mAP rises well above its start), the
signatures and defaults that docs/api.md shows are the functions' own, and docs/training.md's
torch.func example takes the steps that plain SGD takes."""

from __future__ import annotations

import ast
import contextlib
import inspect
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastap

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
API = ROOT / "docs" / "api.md"


def example_and_output() -> tuple[str, str]:
    section = README.read_text(encoding="utf-8").split("\n## Example\n", 1)[1]
    found = re.search(r"```python\n(.*?)```\s*\nprints\s*\n\s*```\n(.*?)```", section, re.S)
    assert found, "README.md: the Example section needs a python block, 'prints', and the output"
    return found.group(1), found.group(2)


def test_readme_example_prints_its_documented_output():
    code, expected = example_and_output()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, f"{README.name} (Example)", "exec"), {"__name__": "__main__"})
    assert printed.getvalue() == expected


def test_quickstart_trains():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--steps", "100"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    held_out = [float(v) for v in re.findall(r"held-out mAP ([\d.]+)", result.stdout)]
    assert len(held_out) == 2, result.stdout  # before training and after step 100
    assert held_out[0] < 0.2 and held_out[1] > 0.5, result.stdout


def python_blocks(path: Path) -> list[str]:
    return python_blocks_of(path.read_text(encoding="utf-8"))


def test_training_md_functional_training_is_plain_sgd():
    """docs/training.md's torch.func example runs, and prints the losses of the same three SGD
    steps taken with loss.backward()."""
    text = (ROOT / "docs" / "training.md").read_text(encoding="utf-8")
    section = text.split("\n## Functional training: `torch.func`\n", 1)[1]
    code = python_blocks_of(section)[0]
    printed = io.StringIO()
    torch.manual_seed(0)
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "docs/training.md (torch.func)", "exec"), {"__name__": "__main__"})
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    inputs, labels = torch.randn(64, 16), torch.randint(0, 4, (64,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    expected = []
    for step in range(3):
        optimizer.zero_grad()
        loss = fastap.APLoss()(model(inputs), labels)
        loss.backward()
        optimizer.step()
        expected.append(f"step {step}: loss {loss.item():.4f}")
    assert printed.getvalue().splitlines() == expected


def python_blocks_of(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


def resolve(dotted: str):
    obj = fastap
    for part in dotted.split(".")[1:]:
        obj = getattr(obj, part)
    return obj


SIGNATURES = [
    found.groups()
    for block in python_blocks(API)
    if (found := re.match(r"(fastap(?:\.\w+)+)\((.*)\)\s*->", block, re.S)) and "<" not in block
]


@pytest.mark.parametrize("name,params", SIGNATURES, ids=[name for name, _ in SIGNATURES])
def test_api_md_signatures_are_the_functions(name, params):
    # "fastap.f(a, b=1, *, c) -> T" in the docs: the same parameters, kinds and defaults as f.
    namespace: dict = {}
    exec(compile(f"def f({re.sub(r'#.*', '', params)}): pass", str(API), "exec"), namespace)
    documented = inspect.signature(namespace["f"]).parameters.values()
    real = inspect.signature(resolve(name)).parameters.values()
    shown = [(p.name, p.kind, p.default) for p in documented]
    assert shown == [(p.name, p.kind, p.default) for p in real], name


def test_api_md_constructor_defaults_are_the_classes():
    # "fastap.APLoss(num_bins=20, ...)": every keyword shown is that parameter's default, and a
    # class shows every parameter of its constructor.
    checked = 0
    for block in python_blocks(API):
        if "->" in block:  # a signature block (the test above), not code
            continue
        for node in ast.walk(ast.parse(block)):
            if not (isinstance(node, ast.Call) and ast.unparse(node.func).startswith("fastap.")):
                continue
            target = resolve(ast.unparse(node.func))
            defaults = inspect.signature(target).parameters
            if inspect.isclass(target):  # a constructor shown: all its parameters, in order
                assert [k.arg for k in node.keywords] == list(defaults), ast.unparse(node)
            for keyword in node.keywords:
                shown = ast.literal_eval(keyword.value)
                assert defaults[keyword.arg].default == shown, (ast.unparse(node), keyword.arg)
                checked += 1
    assert checked >= 8  # APLoss, FastAPLoss, compat.APLoss and compat.TAPLoss


def _dotted(node) -> str | None:
    """'fastap.metrics.mean_average_precision' for such an attribute chain, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else None


def test_docs_calls_use_parameters_that_exist():
    # Every call of a fastap function or class in the python blocks of the README and docs/
    # (those that parse: the signature blocks above do not) passes only keywords it takes.
    checked = 0
    for path in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        for block in python_blocks(path):
            try:
                tree = ast.parse(block)
            except SyntaxError:
                continue
            imported = {
                alias.asname or alias.name: f"{node.module}.{alias.name}"
                for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fastap")
                for alias in node.names
            }
            for node in ast.walk(tree):
                name = _dotted(node.func) if isinstance(node, ast.Call) else None
                if name is None:
                    continue
                head = name.split(".")[0]
                name = imported[head] + name[len(head) :] if head in imported else name
                if not name.startswith("fastap."):
                    continue
                params = inspect.signature(resolve(name)).parameters
                for keyword in node.keywords:
                    assert keyword.arg in params, f"{path.name}: {name} takes no {keyword.arg}"
                    checked += 1
    assert checked >= 20
