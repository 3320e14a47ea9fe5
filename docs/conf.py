"""Sphinx configuration of the scvnet_jax docs (MyST Markdown pages, the colab notebooks
rendered as stored, an API reference by autodoc). Build: `sphinx-build -W --keep-going -b
html docs docs/_build/html` (what .ci/run runs)."""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))              # autodoc imports the checkout's package
os.environ.setdefault("JAX_PLATFORMS", "cpu")

project = "scvnet_jax"
author = "the scvnet_jax authors"
copyright = "2026, the scvnet_jax authors"
release = version = "0.1.0"

extensions = [
    "myst_nb",                 # MyST Markdown pages and the .ipynb notebooks (includes myst_parser)
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",     # Google-style "Args:/Returns:" sections in docstrings
    "sphinx.ext.viewcode",
]
source_suffix = {".md": "myst-nb", ".ipynb": "myst-nb"}
exclude_patterns = ["_build", "README.md", "**/.ipynb_checkpoints"]
# colab/*.ipynb sit outside docs/: docs/notebooks/ holds symlinks to them (see that folder).

# the notebooks are rendered as stored: never executed by the build (CI runs them in
# smoke mode with nbclient, tests/e2e/test_notebooks.py)
nb_execution_mode = "off"
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3                 # [text](page.md#a-heading) links to headings

autodoc_member_order = "bysource"
napoleon_use_ivar = True                 # "Attributes:" as fields, not a second description of each property
autodoc_typehints = "description"
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": False}
nitpicky = False
default_role = "code"                    # `name` in a docstring is code, as in the pages

html_theme = "sphinx_book_theme"
html_title = "scvnet_jax"
html_theme_options = {"show_toc_level": 2}


# The package's docstrings are written for help() and a terminal, not as reStructuredText:
# an indented block after a blank line is a code example, a table is drawn with "|", and a
# wrapped line of a "name: meaning" list is indented under it. Read them that way, before
# napoleon reads their "Args:" / "Attributes:" sections (which it handles itself).
_SECTION = re.compile(r"^\s*(Args|Arguments|Attributes|Returns|Raises|Yields|Example|Examples|Note|Notes):\s*$")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def plain_docstring(app, what, name, obj, options, lines):
    src, out, i = list(lines), [], 0
    while i < len(src):
        line = src[i]
        if _SECTION.match(line):                  # napoleon's: copied as written
            out.append(line)
            i += 1
            while i < len(src) and (not src[i].strip() or _indent(src[i]) > _indent(line)):
                out.append(src[i])
                i += 1
            continue
        if line.strip().startswith("|"):          # a drawn table: shown as drawn
            run = []
            while i < len(src) and src[i].strip().startswith("|"):
                run.append(src[i])
                i += 1
            out += ["", "::", ""] + ["    " + r for r in run] + [""]
            continue
        prev = out[-1] if out else ""
        if _indent(line) > 0 and not prev.strip():   # an indented block: a code example
            run = []
            while i < len(src) and (not src[i].strip() or _indent(src[i]) > 0):
                run.append(src[i])
                i += 1
            while run and not run[-1].strip():
                run.pop()
            out += ["::", ""] + run + [""]
            continue
        if prev.strip() and line.strip() and _indent(line) > _indent(prev):
            out[-1] = prev.rstrip() + " " + line.strip()    # a wrapped line
        else:
            out.append(line)
        i += 1
    lines[:] = out


def setup(app):
    app.connect("autodoc-process-docstring", plain_docstring, priority=400)

# colab/*.ipynb have no cell ids (nbformat < 4.5 files); nbformat warns on every read
import warnings  # noqa: E402
warnings.filterwarnings("ignore", message="Cell is missing an id field")
