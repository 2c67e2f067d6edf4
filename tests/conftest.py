"""Shared fixtures and the checks every test run makes first.

* The compiled decoder must be active, except in a run that selects the
  pure-Python reference on purpose (``MCAST_TRIO_DECODER=python``).
* Under ``make test`` (``MCAST_TRIO_REQUIRE_INSTALLED=1``) the package must be
  imported from the installed copy, not from the source tree.
"""

from __future__ import annotations

import os
import pathlib

import pytest

import mcast_trio

REPO = pathlib.Path(__file__).resolve().parent.parent


def pytest_configure(config):
    wanted = os.environ.get("MCAST_TRIO_DECODER", "compiled").strip().lower() or "compiled"
    active = mcast_trio.decoder_backend()
    if active != wanted:
        raise pytest.UsageError(f"decoder backend is {active!r}, this run requires {wanted!r}")
    if os.environ.get("MCAST_TRIO_REQUIRE_INSTALLED") == "1":
        location = pathlib.Path(mcast_trio.__file__).resolve()
        if REPO / "mcast_trio" in location.parents:
            raise pytest.UsageError(
                f"mcast_trio was imported from the source tree ({location}), not the installed package"
            )


@pytest.fixture(autouse=True, scope="session")
def _outside_the_repository(tmp_path_factory):
    """Run the suite from a scratch directory: ``python -c ...`` puts its
    working directory on ``sys.path``, so a child process started from the
    repository would import its unbuilt source tree instead of the package
    under test. (Tests name every file of the repository through ``REPO``.)"""
    before = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(before)


def _data_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("MCAST_TRIO_TEST_DATA", REPO.parent / "shared" / "data" / "astropix4"))


@pytest.fixture(scope="session")
def astropix_data() -> pathlib.Path:
    """Directory with the astropix-analysis test data (``.apx`` and ``.csv``).

    Found through ``MCAST_TRIO_TEST_DATA`` (default ``../shared/data/astropix4``
    beside the repository); tests using it skip, saying so, where it is absent.
    """
    path = _data_dir()
    if not (path / "20250723_092534_data.apx").is_file():
        pytest.skip(
            f"AstroPix test data not found in {path} (set MCAST_TRIO_TEST_DATA to the directory "
            "holding 20250723_092534_data.apx/.csv from astropix-analysis' tests/data)"
        )
    return path


@pytest.fixture(scope="session")
def mcast_trio_cli() -> list[str]:
    """The argv prefix that runs the ``mcast-trio`` command as a user runs it.

    Under ``make test`` the installed console script (next to this Python);
    from a source tree (``PYTHONPATH`` set to it) ``python -m mcast_trio.cli``.
    Tests run it with :mod:`subprocess` inside the test run's private network
    namespace, so its datagrams stay there.
    """
    import shutil
    import sys

    if os.environ.get("MCAST_TRIO_REQUIRE_INSTALLED") == "1":
        script = pathlib.Path(sys.executable).parent / "mcast-trio"
        if not script.exists():
            found = shutil.which("mcast-trio")
            if found is None:
                raise pytest.UsageError("the mcast-trio console script is not installed")
            script = pathlib.Path(found)
        return [str(script)]
    return [sys.executable, "-m", "mcast_trio.cli"]
