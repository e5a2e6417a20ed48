"""`python -m fuyou_ray ...` runs the CLI (for machines where the console script is not installed)."""

import sys

from fuyou_ray.cli import main

sys.exit(main())
