#!/bin/sh
# Compile mcast_trio/_io/_mmsg.pyx and mcast_trio/_protocol/_kernels.pyx in place
# for development (the .so and .c are git-ignored), then check that the compiled
# recvmmsg/sendmmsg path loads.
#
# Usage: tools/build_mmsg_dev.sh [PYTHON]   (default: /tmp/v0/bin/python, else python3)
# Run the socket tests afterwards inside the private network namespace:
#   PYTHONPATH=. /work/shared/tools/netns-run PYTHON -m pytest tests/test_sockets.py -q
set -eu
cd "$(dirname "$0")/.."
PY=${1:-}
if [ -z "$PY" ]; then
    if [ -x /tmp/v0/bin/python ]; then PY=/tmp/v0/bin/python; else PY=python3; fi
fi
"$PY" -m cython --version >/dev/null 2>&1 || { echo "Cython is not installed for $PY" >&2; exit 1; }
# the same directives as setup.py (they are also in the .pyx header)
"$PY" -c 'from Cython.Build.Cythonize import main; main(["-i", "-3", "mcast_trio/_io/_mmsg.pyx", "mcast_trio/_protocol/_kernels.pyx"])'
PYTHONPATH=. "$PY" -c 'import mcast_trio._io._mmsg as m, mcast_trio._io._batchio as b, mcast_trio._protocol._kernels; print("mcast_trio._io._mmsg:", m.__file__, "HAVE_MMSG =", m.HAVE_MMSG, "; _batchio uses it:", b.HAVE_MMSG)'
