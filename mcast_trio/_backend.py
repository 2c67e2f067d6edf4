"""Selection of the decoder backend: compiled (default) or the Python reference.

The compiled decoder (``mcast_trio._decode``) is what ships. The pure-Python
reference (``mcast_trio._reference``) is selected only explicitly, with the
environment variable ``MCAST_TRIO_DECODER=python`` set before import; it is
never used silently after a failed import: if the extension is missing,
importing mcast_trio fails with a message saying how to fix it.
"""

from __future__ import annotations

import os
import pathlib

from . import _reference
from ._format import HIT_DTYPE, READOUT_DTYPE

ENV_VAR = "MCAST_TRIO_DECODER"
_CHOICES = ("compiled", "python")

_choice = os.environ.get(ENV_VAR, "compiled").strip().lower() or "compiled"
if _choice not in _CHOICES:
    raise ImportError(
        f"{ENV_VAR}={os.environ.get(ENV_VAR)!r} is not a decoder backend; "
        f"allowed: 'compiled' (the default) or 'python' (the slow pure-Python reference)"
    )

def _missing_extension_message(exc: BaseException) -> str:
    """Say why the compiled decoder is missing and what to do about it.

    The usual cause is not a missing compiler but importing the package from
    its source tree (the repository root is the current directory, or on
    ``sys.path``), where the extension was never built: the installed copy is
    shadowed. That case is recognised by the ``.pyx`` source lying beside the
    package's modules with no built extension next to it.
    """
    package = pathlib.Path(__file__).resolve().parent
    built = any(package.glob("_decode.*.so")) or any(package.glob("_decode.*.pyd"))
    if (package / "_decode.pyx").is_file() and not built:
        return (
            "the compiled decoder mcast_trio._decode cannot be loaded: mcast_trio was "
            f"imported from its source tree ({package}), where the extension is not built. "
            "If mcast_trio is installed (`pip install .`), the source tree shadows it: run from "
            "another directory (or drop the repository from sys.path / PYTHONPATH); or build the "
            "extensions in place with `python setup.py build_ext --inplace`. "
            f"{ENV_VAR}=python selects the slow pure-Python reference decoder on purpose."
        )
    return (
        "the compiled decoder mcast_trio._decode is not built or cannot be "
        f"loaded ({exc}). Reinstall mcast_trio with a C compiler available "
        f"(`pip install .`), or set {ENV_VAR}=python to use the slow "
        "pure-Python reference decoder on purpose."
    )


_decode = None
if _choice == "compiled":
    try:
        from . import _decode  # noqa: F811
    except ImportError as exc:  # pragma: no cover - exercised by packaging checks
        raise ImportError(_missing_extension_message(exc)) from exc

    def _check_layout() -> None:
        layout = _decode._layout()
        problems = []
        if layout["hit_size"] != HIT_DTYPE.itemsize:
            problems.append(f"hit record is {layout['hit_size']} bytes, HIT_DTYPE {HIT_DTYPE.itemsize}")
        if layout["readout_size"] != READOUT_DTYPE.itemsize:
            problems.append(
                f"readout record is {layout['readout_size']} bytes, READOUT_DTYPE {READOUT_DTYPE.itemsize}"
            )
        for kind, dtype in (("hit", HIT_DTYPE), ("readout", READOUT_DTYPE)):
            for name, offset in layout[kind].items():
                if dtype.fields[name][1] != offset:
                    problems.append(f"{kind}.{name} at {offset}, dtype says {dtype.fields[name][1]}")
        if problems:  # pragma: no cover - a build bug
            raise ImportError("compiled decoder layout disagrees with the dtypes: " + "; ".join(problems))

    _check_layout()


def decoder_backend() -> str:
    """Return ``"compiled"`` or ``"python"``: the hit decoder in use."""
    return _choice


def use_compiled() -> bool:
    return _choice == "compiled"


reference = _reference
compiled = _decode
