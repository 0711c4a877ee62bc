import sys

from mxprobe.cli import main

sys.exit(main())
