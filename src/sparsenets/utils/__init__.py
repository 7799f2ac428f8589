"""Small shared helpers: the atomic file writer, the cache directory, the timer."""
