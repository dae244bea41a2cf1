"""Offline work: `caprouter train` / `eval` (training), the routing metrics (evaluation),
baseline routers, routing data as arrays, aptitude-suite runs, and prompt-tailored architecture
codes.

May import: serving and everything below it; never the adapters. Serving never imports this.
"""
