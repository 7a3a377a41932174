"""The engine never imports the UI, and the command line starts without torch.

Each check runs in a fresh interpreter: in the test process, textual and torch
are long since loaded by other tests."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import rlhf
import rlhf.commands


def engine_modules() -> list[str]:
    names = [f"rlhf.{m.name}" for m in pkgutil.iter_modules(rlhf.__path__)]
    names += [f"rlhf.commands.{m.name}" for m in pkgutil.iter_modules(rlhf.commands.__path__)]
    return sorted(n for n in names if n != "rlhf.commands")


def fresh(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_no_engine_module_imports_textual():
    modules = engine_modules()
    assert "rlhf.store" in modules and "rlhf.ppo" in modules
    # After each import, name the first module that brought textual in.
    code = ("import importlib, sys\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            "    if 'textual' in sys.modules:\n"
            "        sys.exit(f'{name} imports textual')\n")
    result = fresh(code)
    assert result.returncode == 0, result.stderr or result.stdout


def test_the_command_line_parses_without_torch():
    result = fresh("import sys\nfrom rlhf.cli import build_parser\nbuild_parser()\n"
                   "sys.exit('torch' in sys.modules and 'the parser imported torch')")
    assert result.returncode == 0, result.stderr or result.stdout
