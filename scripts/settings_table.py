"""Print the `train` key table (markdown) that the docs hold, generated from the declarations:
the config parts (`train/config/`) and each architecture's `Settings` (`shared/saes/`).

    python scripts/settings_table.py                      # print it
    python scripts/settings_table.py --write docs/train.md   # replace the table in that file
"""
import sys
from pathlib import Path

from train.config.table import settings_table, with_table

if __name__ == "__main__":
    if sys.argv[1:2] == ["--write"] and len(sys.argv) == 3:
        path = Path(sys.argv[2])
        path.write_text(with_table(path.read_text()))
    elif len(sys.argv) == 1:
        print(settings_table(), end="")
    else:
        sys.exit(__doc__)
