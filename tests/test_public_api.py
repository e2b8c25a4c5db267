"""Public modules export exactly their API: ``dir(module)`` minus private names equals ``__all__`` (no
``np``, ``Any``, ``annotations``, ... leaking as public names), and everything in ``__all__`` exists."""
import importlib
import pkgutil

import pytest

import jlrp

PUBLIC = sorted(m.name for m in pkgutil.iter_modules(jlrp.__path__) if not m.name.startswith("_"))


def test_the_public_modules_are_found():
    assert {"composites", "datasets", "image", "patterns", "rules", "svm"} <= set(PUBLIC)


@pytest.mark.parametrize("name", PUBLIC)
def test_module_exports_exactly_its_api(name):
    module = importlib.import_module(f"jlrp.{name}")
    assert hasattr(module, "__all__"), f"jlrp.{name} has no __all__"
    exported = list(module.__all__)
    assert len(exported) == len(set(exported)), f"jlrp.{name}.__all__ lists a name twice"
    public = {n for n in dir(module) if not n.startswith("_")}
    assert public == set(exported), (f"jlrp.{name}: public names not in __all__: {sorted(public - set(exported))}; "
                                     f"in __all__ but missing: {sorted(set(exported) - public)}")
    assert module.__doc__ and module.__doc__.strip(), f"jlrp.{name} has no module docstring"


def test_datasets_leaks_nothing():  # the example of issue 15
    from jlrp import datasets
    for leaked in ("np", "Any", "Iterator", "annotations", "dataclass", "field"):
        assert not hasattr(datasets, leaked), leaked
    assert sorted(datasets.__all__) == ["Dataset", "fields", "pattern_toy", "shapes", "text"]
