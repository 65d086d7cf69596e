"""Helpers the tests share: the HF oracle, the quality model, PostgreSQL scratch databases, the grid planner."""
