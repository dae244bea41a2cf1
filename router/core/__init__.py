"""The kernel every package imports: errors and their wire tables, the validated config, cost
models, backend names, the name -> implementation registry, the compute thread, message rules,
logging, file helpers.

May import: nothing of the project (the standard library, pydantic, yaml).
"""
