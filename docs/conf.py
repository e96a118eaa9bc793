"""Sphinx configuration of the softcnn documentation.

Built by ``make docs`` with ``-W`` (warnings are errors). Generated files go
to ``docs/generated`` (autosummary stubs) and ``docs/auto_examples``
(sphinx-gallery); both are git-ignored.
"""

import os
import sys
import warnings
from pathlib import Path

# The examples and autodoc run on CPU, one thread: CI machines and laptops
# with two cores must not oversubscribe (set before torch is imported).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import softcnn  # noqa: E402

project = "softcnn"
author = "softcnn developers"
copyright = "softcnn developers, BSD-3-Clause"
release = softcnn.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
    "numpydoc",
    "sphinx_gallery.gen_gallery",
]

templates_path = ["_templates"]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints", "auto_examples/*.ipynb",
                    "auto_examples/*.py", "auto_examples/*.zip"]
source_suffix = {".rst": "restructuredtext"}
root_doc = "index"
# sphinx_gallery_conf holds a function (reset_modules), which Sphinx cannot cache
suppress_warnings = ["config.cache"]
default_role = "code"  # `x` renders as code, never as a broken cross-reference

# -- autodoc / autosummary ---------------------------------------------------
autosummary_generate = True            # stubs under docs/generated (git-ignored)
autosummary_imported_members = False
autodoc_default_options = {"members": False}
autodoc_typehints = "none"             # the numpydoc sections carry the types
autoclass_content = "class"
autodoc_member_order = "groupwise"

# -- numpydoc ----------------------------------------------------------------
# Methods are listed by the class template (autoclass :members:), so numpydoc
# must not add a second, autosummary-based member table.
numpydoc_show_class_members = False
numpydoc_show_inherited_class_members = False
numpydoc_class_members_toctree = False
numpydoc_attributes_as_param_list = True
numpydoc_validation_checks = set()     # style validation is the linters' job, not the build's
numpydoc_xref_param_type = False



# -- sphinx-gallery ----------------------------------------------------------
def _reset_torch(gallery_conf, fname):
    """Same random state and one thread for every example."""
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)


sphinx_gallery_conf = {
    "examples_dirs": ["../examples"],
    "gallery_dirs": ["auto_examples"],
    "filename_pattern": r"/plot_",
    "ignore_pattern": r"__init__\.py|/_",
    "within_subsection_order": "FileNameSortKey",
    "reset_modules": ("matplotlib", "seaborn", _reset_torch),
    "abort_on_example_error": False,   # report every failing example; -W fails the build
    "only_warn_on_example_error": False,
    "download_all_examples": False,
    "remove_config_comments": True,
    "plot_gallery": "True",
    "min_reported_time": 0,
    "show_memory": False,
    "capture_repr": ("_repr_html_", "__repr__"),
    "matplotlib_animations": False,
    "backreferences_dir": None,
    "image_scrapers": ("matplotlib",),
}

# Warnings raised by the examples themselves (ConvergenceWarning of a short
# demo fit) are part of their output, not documentation errors.
warnings.filterwarnings("ignore", category=UserWarning, message="Matplotlib is currently using agg")

# -- HTML --------------------------------------------------------------------
html_theme = "pydata_sphinx_theme"
html_title = f"softcnn {release}"
html_static_path = []
html_theme_options = {
    "navigation_depth": 3,
    "show_toc_level": 2,
    "navbar_align": "left",
    "secondary_sidebar_items": ["page-toc"],
    "footer_start": ["copyright"],
    "footer_end": ["sphinx-version"],
}
html_sidebars = {"index": [], "getting_started": []}
html_show_sourcelink = False

mathjax3_config = {"tex": {"macros": {"R": r"\mathbb{R}", "prox": r"\operatorname{prox}"}}}
