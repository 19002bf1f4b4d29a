"""Sphinx configuration for the cellvae documentation.

Build with ``make docs`` (warnings are errors). Nothing here reaches the network: no intersphinx,
notebooks are rendered from their saved outputs, never executed.

Two pages are assembled at build time so that the build passes while parts of the package are still
being written, and picks them up without edits once they land:

* ``api.md`` is *written by this file* from :data:`API` below (it is git-ignored; edit :data:`API`,
  not the generated page). See :func:`write_api_page`.
* ``tutorials.md`` keeps its toctree of notebooks in the repository's ``notebooks/`` folder
  (reached through the ``docs/notebooks`` symlink); entries whose notebook does not exist yet are
  dropped, and notebooks found but not listed are appended. See :func:`tutorials_toctree`.
"""

from __future__ import annotations

import importlib
import re
import sys
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

import cellvae  # noqa: E402

# sphinx_autodoc_typehints 3.6 calls a Sphinx API deprecated in Sphinx 9: a Python deprecation
# notice about the extension itself (not a Sphinx warning), silenced for that module only.
warnings.filterwarnings("ignore", category=DeprecationWarning, module="sphinx_autodoc_typehints")

# -- Project -----------------------------------------------------------------------------------

project = "cellvae"
author = "cellvae developers"
copyright = "cellvae developers"
release = cellvae.__version__
version = ".".join(release.split(".")[:2])

# -- Extensions --------------------------------------------------------------------------------

extensions = [
    "myst_nb",  # also loads myst_parser
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",  # must come before sphinx_autodoc_typehints
    "sphinx_autodoc_typehints",
    "sphinx.ext.mathjax",
]

templates_path = ["_templates"]
exclude_patterns = ["_build", "**/.ipynb_checkpoints"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}

# MyST: $...$ and $$...$$ math, \begin{align} blocks, ::: fences, anchors for README-style links.
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3

# myst-nb: show the outputs saved in the notebooks; never run them at build time.
nb_execution_mode = "off"

# autodoc / autosummary: stubs are generated into docs/generated (git-ignored).
autosummary_generate = True
autosummary_imported_members = False
autodoc_member_order = "bysource"
autoclass_content = "class"
autodoc_typehints = "description"  # types go in the parameter list, not the signature

# napoleon: numpy-style docstrings only (the package follows numpydoc, see DESIGN.md section 2).
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = True
napoleon_use_param = True

# sphinx_autodoc_typehints
typehints_document_rtype = True
always_document_param_types = False
typehints_defaults = "comma"

# -- HTML --------------------------------------------------------------------------------------

html_theme = "sphinx_book_theme"
html_title = "cellvae"
html_static_path: list[str] = []
html_theme_options = {
    "show_toc_level": 2,
    "navigation_with_keys": False,
}

# -- The API page ------------------------------------------------------------------------------
#
# Each entry: (section title, module, planned public names, take extra names from __all__).
# At build time a section is kept when its module imports; a name is kept when the module has it.
# Names in the module's ``__all__`` that are not listed are appended (submodules excepted), so a new
# public function in ``cellvae.tl`` / ``cellvae.pl`` or a new model exported from ``cellvae``
# appears with no edit here. A module that does not exist yet
# (ModuleNotFoundError for that very module) is skipped; any other import error fails the build.

API: list[tuple[str, str, list[str], bool]] = [
    ("Preprocessing: `pp`", "cellvae.pp", ["setup_anndata", "transfer_setup", "view_setup"], True),
    ("Tools: `tl`", "cellvae.tl", [], True),
    ("Plotting: `pl`", "cellvae.pl", [], True),
    ("Models", "cellvae", ["SCVI", "TOTALVI"], True),
    ("Datasets: `datasets`", "cellvae.datasets", ["kang_ifnb", "eccite_pbmc", "synthetic"], True),
    ("Modules: `module`", "cellvae.module", ["VAE", "TOTALVAE"], False),
    ("Training: `train`", "cellvae.train", ["TrainConfig", "TrainingError"], False),
    (
        "Neural network blocks: `nn`",
        "cellvae.nn",
        ["FCLayers", "Encoder", "DecoderSCVI", "EncoderTOTALVI", "DecoderTOTALVI"],
        True,
    ),
    (
        "Distributions: `distributions`",
        "cellvae.distributions",
        [
            "NegativeBinomial",
            "ZeroInflatedNegativeBinomial",
            "Poisson",
            "Normal",
            "NegativeBinomialMixture",
        ],
        True,
    ),
]

API_INTRO = """\
# API

```{eval-rst}
.. module:: cellvae
```

Import as:

```python
import cellvae
```

The usual flow is `cellvae.pp.setup_anndata(adata, ...)`, then a model (`cellvae.SCVI(adata)`,
`.train()`), then the `tl` one-liners that write results into `adata`, and scanpy as usual.

<!-- This page is generated by docs/conf.py from its API list: edit that list, not this file. -->
"""


def _import_module(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name == name:  # not written yet
            return None
        raise


def api_sections() -> list[tuple[str, str, list[str]]]:
    """Return ``(title, module, names)`` for the parts of :data:`API` that exist right now."""
    sections = []
    for title, modname, planned, extend in API:
        module = _import_module(modname)
        if module is None:
            continue
        names = [n for n in planned if hasattr(module, n)]
        if extend:
            names += [n for n in getattr(module, "__all__", []) if n not in names]
        # Submodules in __all__ (cellvae.pp, ...) have their own section; skip them here.
        names = [
            n for n in names if hasattr(module, n) and not isinstance(getattr(module, n), type(sys))
        ]
        if names:
            sections.append((title, modname, names))
    return sections


def _render_api(sections: list[tuple[str, str, list[str]]]) -> str:
    parts = [API_INTRO]
    for title, modname, names in sections:
        rel = modname.removeprefix("cellvae").removeprefix(".")
        entries = "\n".join(f"   {rel + '.' if rel else ''}{n}" for n in names)
        module_line = f".. module:: {modname}\n" if rel else ""
        parts.append(
            f"## {title}\n\n```{{eval-rst}}\n{module_line}.. currentmodule:: cellvae\n\n"
            f".. autosummary::\n   :toctree: generated\n\n{entries}\n```\n"
        )
    return "\n".join(parts)


def write_api_page() -> None:
    """Write ``api.md`` (only when its text changes) and prune stale stubs in ``generated/``."""
    sections = api_sections()
    text = _render_api(sections)
    page = HERE / "api.md"
    if not page.exists() or page.read_text() != text:
        page.write_text(text)
    # autosummary never deletes stubs; a stub for a name that is gone would fail to import.
    wanted = {f"{mod}.{n}" for _, mod, names in sections for n in names}
    for stub in (HERE / "generated").glob("*.rst"):
        if stub.stem not in wanted:
            stub.unlink()
    missing = [
        f"{mod}.{n}" for _, mod, planned, _ in API for n in planned if f"{mod}.{n}" not in wanted
    ]
    if missing:
        print(f"[cellvae docs] not documented yet (not importable): {', '.join(missing)}")


write_api_page()

# -- The tutorials page ------------------------------------------------------------------------

_TOCTREE = re.compile(r"```\{toctree\}\n(?P<body>.*?)```", re.S)


def tutorials_toctree(app, docname: str, source: list[str]) -> None:
    """Keep the tutorial entries whose notebook exists; append unlisted notebooks."""
    if docname != "tutorials":
        return
    found = sorted(d for d in app.env.found_docs if d.startswith("notebooks/"))

    def fix(match: re.Match) -> str:
        lines = match.group("body").splitlines()
        options = [ln for ln in lines if ln.startswith(":")]
        listed = [ln.strip() for ln in lines if ln.strip() and not ln.startswith(":")]
        keep = [d for d in listed if d in found] + [d for d in found if d not in listed]
        if not keep:
            return "```{note}\nNo tutorial notebook is in `notebooks/` yet.\n```"
        return "```{toctree}\n" + "\n".join(options) + "\n\n" + "\n".join(keep) + "\n```"

    source[0] = _TOCTREE.sub(fix, source[0])


def always_reread_tutorials(app, env, added, changed, removed) -> list[str]:
    """Re-read ``tutorials`` on every build: its toctree depends on which notebooks exist."""
    return ["tutorials"]


# -- The README on the front page --------------------------------------------------------------
#
# index.md includes ../README.md, whose links are relative to the repository root. Links to pages
# of this site (docs/*.md, notebooks/*.ipynb) become project links; links to other files of the
# repository (benchmarks/, LICENSE, ...) are not pages of the site, so they become plain text with
# the path. Links with a scheme (https:, mailto:) and anchors (#...) are left alone.

_MD_LINK = re.compile(r"(?<!!)\[(?P<text>[^\]]*)\]\((?P<target>[^)\s]+)\)")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def readme_links(app, relative_path, parent_docname: str, content: list[str]) -> None:
    """Rewrite the repository-relative links of the included README for the docs tree."""
    if Path(relative_path).name != "README.md" or parent_docname != "index":
        return

    def fix(match: re.Match) -> str:
        text, target = match.group("text"), match.group("target")
        if target.startswith(("#", "/")) or _SCHEME.match(target):
            return match.group(0)
        path, _, anchor = target.partition("#")
        path = path.removeprefix("./")
        in_docs = path.removeprefix("docs/") if path.startswith("docs/") else path
        if (HERE / in_docs).is_file() and Path(in_docs).suffix in app.config.source_suffix:
            if not in_docs.startswith("notebooks/"):
                return f"[{text}](project:/{in_docs}{'#' + anchor if anchor else ''})"
            # project: links resolve symlinks, and docs/notebooks is one: use the doc role.
            docname = "/" + str(Path(in_docs).with_suffix(""))
            if "`" in text or "<" in text or not text:
                return f"{{doc}}`{docname}`"
            return f"{{doc}}`{text} <{docname}>`"
        return f"`{path}`" if text.strip("`") == path else f"{text} (`{path}`)"

    content[0] = _MD_LINK.sub(fix, content[0])


# -- Class pages: only what cellvae defines ---------------------------------------------------
#
# Class stubs use ``:members:`` and ``:inherited-members:`` (so methods of a cellvae base class,
# e.g. the models' shared ``train``, are shown), but members that a class inherits from PyTorch
# (``nn.Module.apply``, ``Distribution.expand``, ...) are skipped: they are not cellvae's API, and
# their docstrings are not numpydoc.


def _defined_in_cellvae(obj) -> bool | None:
    for attr in ("fget", "__func__", "func", "wrapped"):  # property, classmethod, partial, lazy
        obj = getattr(obj, attr, obj)
    module = getattr(obj, "__module__", None)
    return None if not isinstance(module, str) else module.split(".")[0] == "cellvae"


def skip_foreign_members(app, what, name, obj, skip, options) -> bool | None:
    """Skip class members defined outside cellvae; leave every other decision to autodoc."""
    if what == "class" and _defined_in_cellvae(obj) is False:
        return True
    return None


def setup(app) -> None:
    app.connect("autodoc-skip-member", skip_foreign_members)
    app.connect("include-read", readme_links)
    app.connect("source-read", tutorials_toctree)
    app.connect("env-get-outdated", always_reread_tutorials)
