"""Docstrings render: no LaTeX command was eaten by a string escape (``\\frac`` -> form feed)."""

import importlib
import inspect

import pytest

MODULES = ["softcnn", "softcnn.cv", "softcnn.datasets", "softcnn.diagnostics", "softcnn.estimators",
           "softcnn.layers", "softcnn.limits", "softcnn.network", "softcnn.path", "softcnn.penalties",
           "softcnn.plotting", "softcnn.prox", "softcnn.solvers", "softcnn.stats"]
CONTROL = "\x07\x08\x0b\x0c\r\t"


def public_objects():
    for name in MODULES:
        module = importlib.import_module(name)
        yield name, module
        for attr in getattr(module, "__all__", []):
            obj = getattr(module, attr)
            yield f"{name}.{attr}", obj
            if inspect.isclass(obj):
                for meth_name, meth in vars(obj).items():
                    if callable(meth) and not meth_name.startswith("_"):
                        yield f"{name}.{attr}.{meth_name}", meth


@pytest.mark.parametrize("name,obj", list(public_objects()), ids=lambda v: v if isinstance(v, str) else "")
def test_docstring_has_no_control_characters(name, obj):
    doc = inspect.getdoc(obj) or ""
    bad = sorted({repr(c) for c in doc if c in CONTROL})
    assert not bad, f"{name}: {bad} in the docstring (use a raw string for LaTeX)"
