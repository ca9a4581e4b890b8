"""Full-ranking evaluation, metrics and baselines."""
