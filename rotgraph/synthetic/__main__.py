"""python -m rotgraph.synthetic: write a synthetic decoder (see the package docstring)."""

import sys

from rotgraph.synthetic.cli import main

sys.exit(main())
