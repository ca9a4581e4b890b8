"""recsys: accuracy-efficiency trade-offs of PLM two-tower recommenders."""
__version__ = "0.1.0"
