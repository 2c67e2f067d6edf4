"""The complete example of docs/testing.rst runs as written (in a separate
pytest run, as a user would copy it)."""

from __future__ import annotations

import importlib.metadata
import pathlib
import re
import subprocess
import sys

DOC = pathlib.Path(__file__).resolve().parent.parent / "docs" / "testing.rst"


def _first_python_block(text: str) -> str:
    match = re.search(r"\.\. code-block:: python\n\n((?:(?:   .*)?\n)+)", text)
    assert match, "no python code block in docs/testing.rst"
    return "\n".join(line[3:] for line in match.group(1).splitlines()) + "\n"


def test_testing_page_example_passes(tmp_path):
    code = _first_python_block(DOC.read_text())
    assert "async def test_monitor_on_a_lossy_network" in code
    (tmp_path / "test_example.py").write_text(code)
    (tmp_path / "pytest.ini").write_text("[pytest]\ntrio_mode = true\n")
    args = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_example.py")]
    registered = any(ep.name == "mcast_trio" for ep in importlib.metadata.entry_points(group="pytest11"))
    if not registered:  # a source checkout: load the plugin by module name
        args[3:3] = ["-p", "mcast_trio.testing._plugin"]
    proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout
