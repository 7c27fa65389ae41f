import sys

from pgrpo.cli import main

sys.exit(main())
