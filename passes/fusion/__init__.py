"""Fusion passes: several nodes become one that computes the same thing faster."""
