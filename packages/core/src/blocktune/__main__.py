import sys

from blocktune.cli import main

sys.exit(main())
