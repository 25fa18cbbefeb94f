"""The suite's own layout: pytest imports test modules by basename (rootdir-relative, no packages), so two test
files with one name in different folders stop the collection of the whole suite, in CI too."""
from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def test_every_test_module_has_its_own_basename():
    names = Counter(p.name for p in TESTS.rglob("test_*.py"))
    assert not [n for n, k in names.items() if k > 1], sorted(n for n, k in names.items() if k > 1)


# the fixtures that import ComfyUI or start it (tests/conftest.py)
COMFY_FIXTURES = {"comfy", "comfy_server", "new_comfy_server", "kiln_env", "sd1_checkpoint", "sd3_checkpoint",
                  "sdxl_checkpoint", "tiny_sd1_path", "tiny_sd3_path", "tiny_sd3_split", "tiny_sdxl_path"}
PROCESS_MODULES = {"subprocess", "multiprocessing"}


def test_unit_tests_stay_in_process_without_comfyui():
    """tests/unit/ is the in-process lane (tests/README.md): no subprocess or multiprocessing import, no ComfyUI
    fixture; such tests belong in tests/system/, tests/integration/ or tests/e2e/."""
    import ast
    found = []
    for path in sorted((TESTS / "unit").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found += [(path.name, a.name) for a in node.names if a.name.split(".")[0] in PROCESS_MODULES]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PROCESS_MODULES:
                found.append((path.name, node.module))
            elif isinstance(node, ast.FunctionDef):
                found += [(path.name, f"{node.name}({a.arg})") for a in node.args.args if a.arg in COMFY_FIXTURES]
    assert not found, found
