import sys

from mxprobe.app.cli import main

sys.exit(main())
