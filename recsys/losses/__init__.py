"""Training losses: task losses, efficiency penalties, distillation."""
