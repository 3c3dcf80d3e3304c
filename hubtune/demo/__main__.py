"""`python -m hubtune.demo`: the same as `hubtune demo`."""

import sys

from hubtune.demo import main

sys.exit(main())
