import os
import pathlib

import mcast_trio
from mcast_trio import _backend


def test_backend_is_the_one_this_run_selected():
    wanted = os.environ.get("MCAST_TRIO_DECODER", "compiled").strip().lower() or "compiled"
    assert mcast_trio.decoder_backend() == wanted


def test_compiled_extension_is_a_shared_object():
    # The compiled decoder ships: it is importable in every run, also when the
    # reference is selected on purpose.
    from mcast_trio import _decode

    assert pathlib.Path(_decode.__file__).suffix in (".so", ".pyd")
    if mcast_trio.decoder_backend() == "compiled":
        assert _backend.implementation is _decode


def test_unknown_backend_name_is_rejected(tmp_path):
    import subprocess
    import sys

    env = dict(os.environ, MCAST_TRIO_DECODER="fortran")
    proc = subprocess.run([sys.executable, "-c", "import mcast_trio"], env=env, capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode != 0
    assert "MCAST_TRIO_DECODER='fortran' is not a decoder backend" in proc.stderr
    assert "'compiled'" in proc.stderr and "'python'" in proc.stderr


def test_import_from_an_unbuilt_source_tree_says_so(tmp_path):
    # A user who runs Python in the repository root imports the source tree,
    # where the extension was never built: the message must name that cause,
    # not ask for a C compiler.
    import shutil
    import subprocess
    import sys

    repo = pathlib.Path(__file__).resolve().parent.parent
    tree = tmp_path / "checkout"
    shutil.copytree(repo / "mcast_trio", tree / "mcast_trio",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "*.c", "__pycache__"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MCAST_TRIO_DECODER")}
    proc = subprocess.run([sys.executable, "-c", "import mcast_trio"], env=env, capture_output=True, text=True,
                          cwd=tree)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "imported from its source tree" in last
    assert str(tree / "mcast_trio") in last
    assert "run from another directory" in last
    assert "C compiler" not in last
