"""Measurements of the engine. Never imported by ``engine/``."""
