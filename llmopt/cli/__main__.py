"""``python -m llmopt.cli`` (and ``accelerate launch -m llmopt.cli``): the ``llmopt`` command."""

import sys

from llmopt.cli import main

sys.exit(main())
