"""Efficiency: model shapes, cost models, gates and materialization."""
