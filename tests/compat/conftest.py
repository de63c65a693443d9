"""Every test in this folder checks upstream dictionary_learning's names, call forms, configs or
files against this package: each is marked `compat` (`python -m pytest -m compat` runs them alone).
Those that also run upstream itself in its venv carry `peers` as well."""

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


# before -m deselects, so `-m compat` and `-m "not compat"` see the marker
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.compat)
