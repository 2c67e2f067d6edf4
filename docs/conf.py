"""Sphinx configuration of the mcast_trio documentation.

Built in CI with ``sphinx-build -W --keep-going -b html docs <out>`` (``make
docs``): every warning is an error. The build needs no network: no
intersphinx inventories are downloaded, and the package itself must be
importable (installed in the venv, or built in place and on ``PYTHONPATH``).
"""

from __future__ import annotations

import mcast_trio

project = "mcast_trio"
author = "mcast_trio developers"
copyright = "mcast_trio developers"
release = mcast_trio.__version__
version = ".".join(release.split(".")[:2])

def _framings_table() -> None:
    """Write the framing table (``FRAMINGS``, what sender and receiver read)
    as reStructuredText for ``transport.rst`` to include."""
    import pathlib

    from mcast_trio._protocol._framings import FRAMINGS

    columns = ["fragments", "topics", "objects", "sequenced", "reassembly", "msgpack", "raw_readouts"]
    lines = [".. list-table::", "   :header-rows: 1", "", "   * - framing", "     - what it is"]
    lines += [f"     - ``{c}``" for c in columns]
    for framing in FRAMINGS.values():
        lines += [f"   * - ``{framing.name}``", f"     - {framing.description}"]
        lines += [f"     - {'yes' if getattr(framing, c) else 'no'}" for c in columns]
    out = pathlib.Path(__file__).parent / "_generated"
    out.mkdir(exist_ok=True)
    (out / "framings.rst").write_text("\n".join(lines) + "\n")


_framings_table()


def _cli_reference() -> None:
    """Write every ``mcast-trio`` subcommand's ``--help`` (the click commands
    themselves) as reStructuredText for ``cli.rst`` to include, so the page
    cannot drift from the program."""
    import pathlib

    import click

    from mcast_trio.cli._app import cli

    root = click.Context(cli, info_name="mcast-trio", terminal_width=100, max_content_width=100)
    lines = []
    for name in cli.list_commands(root):
        command = cli.get_command(root, name)
        title = f"mcast-trio {name}"
        lines += [title, "-" * len(title), "", ".. code-block:: text", ""]
        help_text = command.get_help(click.Context(command, info_name=name, parent=root,
                                                   terminal_width=100, max_content_width=100))
        lines += [("   " + line).rstrip() for line in help_text.splitlines()]
        lines.append("")
    out = pathlib.Path(__file__).parent / "_generated"
    out.mkdir(exist_ok=True)
    (out / "cli.rst").write_text("\n".join(lines) + "\n")


_cli_reference()

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
]

# No intersphinx: CI has no network access apart from package registries.
# References to the standard library, numpy or trio render as plain text.

source_suffix = {".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "_generated", "Thumbs.db", ".DS_Store"]
templates_path: list[str] = []

# Unresolvable references (numpy, trio, stdlib types in signatures) are not
# errors: without intersphinx they cannot be resolved.
nitpicky = False

# -- autodoc / napoleon -------------------------------------------------------

autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_member_order = "bysource"
autodoc_preserve_defaults = True
autodoc_class_signature = "mixed"
# Base classes are shown only where they matter (exceptions, enums), with
# :show-inheritance: in api.rst; "Bases: object" everywhere would be noise.
autodoc_default_options: dict[str, object] = {}

napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_include_init_with_doc = False
# "Attributes:" sections become ":ivar:" fields, not indexed objects: otherwise
# an attribute named like a builtin (``SenderStatistics.bytes``) becomes a
# fuzzy target for every ``bytes`` type annotation.
napoleon_use_ivar = True
napoleon_use_rtype = True
# "Cancellation:" paragraphs in docstrings are rendered as plain text; "Warns:"
# and "Yields:" are standard napoleon sections.

# -- HTML ---------------------------------------------------------------------

html_theme = "alabaster"
html_theme_options = {
    "description": "Multicast DAQ readouts to passive monitors, under trio",
    "fixed_sidebar": True,
}
html_static_path: list[str] = []
html_show_sourcelink = False
