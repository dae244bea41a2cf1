"""The serving path, free of grpc and ray: RouterService (validate, embed, predict, select,
dispatch with fallback, Feedback, Onboard), the composition root that builds it from config
(``app``), Onboard's durable registrations, and the telemetry interface.

May import: the kernel, policy, prediction, backends, datastore, encoders.
"""
