"""trainer_core's folders show the architecture: no module outside its concern's folder, and docs/architecture.md's
layout names every module, so a newcomer finds each file where the doc says it is."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "trainer_core"


def test_trainer_core_root_holds_only_packages_and_errors():
    loose = sorted(p.name for p in CORE.glob("*.py") if p.name not in ("__init__.py", "errors.py"))
    assert not loose, f"put these modules in the folder of their concern (docs/architecture.md, Layout): {loose}"


def test_architecture_layout_names_every_module():
    layout = (ROOT / "docs" / "architecture.md").read_text()
    missing = [str(p.relative_to(ROOT)) for p in sorted(CORE.rglob("*.py"))
               if p.name != "__init__.py" and p.name not in layout]
    assert not missing, f"docs/architecture.md's layout does not name: {missing}"
    folders = [p.name for p in CORE.iterdir() if p.is_dir() and (p / "__init__.py").exists()]
    assert all(f"  {name}/" in layout for name in folders), folders
