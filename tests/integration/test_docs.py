"""docs/nodes.md and docs/training-args.md are what scripts/docs.py generates from the loaded nodes and the
training_args table: a stale page fails here (regenerate with scripts/docs.py)."""
import docs  # scripts/docs.py (scripts/ is on sys.path via conftest)


def test_generated_pages_are_current(comfy):
    for path, text in docs.pages(comfy).items():
        assert path.is_file() and path.read_text(encoding="utf-8") == text, \
            f"{path.name} is stale: run scripts/docs.py (set -a; . .kiln/env; set +a; \"$KILN_PYTHON\" scripts/docs.py)"
