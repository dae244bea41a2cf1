"""Adapters from the wire to the service: the gRPC server and its proto conversion, the
OpenAI-compatible HTTP server and its conversion, the one guard both share (readiness and the
exception ladder), and the Ray Serve ingress.

May import: serving and everything below it, the generated protos (``caprouter.v1``); never
offline code.
"""
