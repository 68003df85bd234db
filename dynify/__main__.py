import sys

from dynify.cli import main

sys.exit(main())
