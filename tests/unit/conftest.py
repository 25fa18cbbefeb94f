import sys
from pathlib import Path

# trainer_core is importable standalone; appended (not prepended) so ComfyUI's own top-level modules
# (`nodes`, `utils`) win over this repo's folders when a session also imports ComfyUI.
_REPO = str(Path(__file__).resolve().parents[2])
if _REPO not in sys.path:
    sys.path.append(_REPO)
