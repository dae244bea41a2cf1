"""The selection policy: pure functions from predictions and knobs to a ranked decision
(``selection``), and traffic-level budgets solved as an assignment problem (``budget``).

May import: the kernel only.
"""
