import sys

from batchroute.cli import main

sys.exit(main())
