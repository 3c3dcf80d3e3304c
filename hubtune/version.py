"""hubtune's version, in a module of its own: every module can import it without importing the package's
`ImageClassifier` (and what it imports)."""

__version__ = "0.1.0"
