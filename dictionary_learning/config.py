"""Package-wide flags, at upstream's import path (`dictionary_learning.config.DEBUG`)."""

DEBUG = False  # upstream's debugging flag, read by scripts that import it
