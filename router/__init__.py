"""caprouter's router: everything between a request and a backend, in one-way layers.

    router.cli, router.client        the command line and the Python client (top)
    router.adapters                  gRPC, OpenAI-compatible HTTP, Ray Serve ingress: wire <-> service
    router.offline                   training, evaluation, baselines, routing data, aptitude runs, codes
    router.serving                   RouterService, the composition root (App), registrations, telemetry
    router.policy | router.prediction   selection and budgets | quality and cost per backend
    backends | datastore | encoders  (top-level packages) dispatch targets, outcomes, embeddings
    router.core                      the kernel: errors, config, costs, names, registry, compute, logs

Each layer imports only the layers below it (checked by import-linter: ``scripts/lint.sh``);
adapters and offline code never import each other; offline code may use serving code, never the
reverse.
"""

__version__ = "0.1.0"
