import sys

from vmm.cli import main

sys.exit(main())
