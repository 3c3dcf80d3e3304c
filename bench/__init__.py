"""hubtune's benchmark suite: `python bench/run.py [--quick] [--only NAME]` (see bench/README.md)."""
