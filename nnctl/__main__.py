import sys

from nnctl.cli import main

sys.exit(main())
