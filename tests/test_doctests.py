"""The usage examples in the package's docstrings run and print what they show."""
import doctest
import importlib
import pkgutil

import scratchproto


def test_every_docstring_example_runs():
    attempted = 0
    for info in pkgutil.iter_modules(scratchproto.__path__):
        module = importlib.import_module(f"scratchproto.{info.name}")
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0, f"{info.name}: {result.failed} of {result.attempted} examples failed"
        attempted += result.attempted
    assert attempted >= 10      # Backbone, ProtoNet and FolderLock have examples
