"""What runs record about themselves (hardware, versions, git) and where they are tracked (CSV, W&B)."""
