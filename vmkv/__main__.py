import sys

from vmkv.cli import main

sys.exit(main())
