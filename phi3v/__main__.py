import sys

from phi3v.cli import main

sys.exit(main())
