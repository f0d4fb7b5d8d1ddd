"""Helpers every layer of the package may import: argument checks, the compile switch, plotting."""
