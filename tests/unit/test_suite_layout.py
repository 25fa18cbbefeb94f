"""The suite's own layout: pytest imports test modules by basename (rootdir-relative, no packages), so two test
files with one name in different folders stop the collection of the whole suite, in CI too."""
from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_every_test_module_has_its_own_basename():
    names = Counter(p.name for p in TESTS.rglob("test_*.py"))
    assert not [n for n, k in names.items() if k > 1], sorted(n for n, k in names.items() if k > 1)
