import sys
from pathlib import Path

# `training/` is a top-level folder of the repository, not part of the installed package:
# make it importable however pytest was started (plain `pytest` does not put the root on the path).
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
