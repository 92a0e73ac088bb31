"""Pattern rewriting: patterns written as op calls, rules of pattern/check/rewrite, one driver.

See `pattern.py` (how to write patterns), `rule.py` (rules and the worklist driver) and
`docs/passes.md` for a worked example.
"""

from graphopt.passes.rewrite.matcher import Match, match
from graphopt.passes.rewrite.pattern import Const, OpBuilder, Var, trace
from graphopt.passes.rewrite.rule import (
    RewriteBuilder,
    RewriteContext,
    RewritePass,
    RewriteRule,
    apply_rules,
)

__all__ = [
    "Const",
    "Match",
    "OpBuilder",
    "RewriteBuilder",
    "RewriteContext",
    "RewritePass",
    "RewriteRule",
    "Var",
    "apply_rules",
    "match",
    "trace",
]
