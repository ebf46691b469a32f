"""``python -m autoprune``: the command line (the package drops the current directory from the import
path first; see ``autoprune/__init__.py``)."""
import sys

from .cli import main

sys.exit(main())
