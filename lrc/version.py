"""lrc's version, in a module of its own so that any layer can read it without importing the
package (whose lazy public names sit above every layer)."""

__version__ = "0.1.0"
