import sys

from deepscope.cli import main

sys.exit(main())
