"""``python -m dynify``: the command line (:func:`dynify.cli.main`)."""

import sys

try:
    from dynify.cli import main
except KeyboardInterrupt:  # Ctrl-C before the command line's own handling is in place
    print("dynify: interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
