import sys

from pdp.cli import main

sys.exit(main())
