"""Clean-up passes: constant folding, dead code, common subexpressions, shapes, canonical forms."""
