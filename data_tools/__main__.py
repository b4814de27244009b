"""``python -m data_tools`` = the ``spade-data`` console script."""
import sys

from data_tools.cli import main

sys.exit(main())
