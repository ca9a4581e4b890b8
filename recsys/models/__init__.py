"""Models: the transformer encoder and the towers built on it."""
