"""crosslora's version, in one place (the package, the report and the bench cache read it)."""

__version__ = "0.1.0"
