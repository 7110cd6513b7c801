"""``toollmm.cli.run``: how every ``code/<name>.py`` and console script starts its module."""

import ast
import importlib
import os
import subprocess
import sys
import textwrap

from conftest import ROOT

ENTRY = textwrap.dedent('''
    import atexit, gc, sys
    FROZEN_AT_IMPORT = gc.get_freeze_count()
    IMPORTED_WITH_GC = gc.isenabled()

    def main():
        print("main", IMPORTED_WITH_GC, FROZEN_AT_IMPORT, gc.isenabled(), gc.get_freeze_count() > 0, sys.argv[1:])
        atexit.register(lambda: print("exit", gc.get_freeze_count() > FROZEN_AT_MAIN, flush=True))
        global FROZEN_AT_MAIN
        FROZEN_AT_MAIN = gc.get_freeze_count()
        if "--fail" in sys.argv:
            raise SystemExit("bad input")
''')


def launch(tmp_path, *args):
    (tmp_path / "fake_entry.py").write_text(ENTRY)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT / "code")])}
    return subprocess.run([sys.executable, "-c", "from toollmm.cli import run; run('fake_entry')", *args],
                          capture_output=True, text=True, env=env, timeout=120)


def test_run_imports_without_collections_then_freezes_before_main_and_at_exit(tmp_path):
    result = launch(tmp_path, "--flag")
    assert result.returncode == 0, result.stderr
    # Imported with the collector off and nothing frozen yet; main runs with it on, the imports frozen.
    assert result.stdout.splitlines() == ["main False 0 True True ['--flag']", "exit True"]


def test_run_freezes_and_exits_with_mains_status_on_an_error(tmp_path):
    result = launch(tmp_path, "--fail")
    assert result.returncode == 1
    assert result.stderr.strip() == "bad input"
    assert result.stdout.splitlines()[-1] == "exit True"


def test_every_script_in_code_runs_an_entry_module_with_a_main():
    scripts = sorted((ROOT / "code").glob("*.py"))
    assert len(scripts) >= 10
    for script in scripts:
        calls = [node for node in ast.walk(ast.parse(script.read_text())) if isinstance(node, ast.Call)
                 and getattr(node.func, "id", None) == "run"]
        assert len(calls) == 1, f"{script.name}: expected one run('<module>') call"
        module = calls[0].args[0].value
        assert callable(importlib.import_module(module).main), f"{script.name}: {module} has no main"
