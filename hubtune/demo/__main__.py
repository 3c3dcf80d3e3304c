"""`python -m hubtune.demo`: the same as `hubtune demo`."""

import sys

from hubtune.demo.run import main

sys.exit(main())
