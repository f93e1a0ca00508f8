"""Print the `train` key table (markdown) that the docs hold, generated from the declarations:
the config parts (`train/config/`) and each architecture's `Settings` (`shared/saes/`).

    python scripts/settings_table.py
"""
from train.config.table import settings_table

if __name__ == "__main__":
    print(settings_table(), end="")
