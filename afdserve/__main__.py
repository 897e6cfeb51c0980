import sys

from afdserve.cli import main

sys.exit(main())
