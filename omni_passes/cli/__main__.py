import sys

from omni_passes.cli import main

sys.exit(main())
