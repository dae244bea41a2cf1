"""Retrieval datastore: a FAISS index over prompt embeddings and the outcomes seen for them
(``Datastore`` protocol, the FAISS kNN store, outcome records, the durable append log).

May import: the kernel (``router.core``) only.
"""
from datastore.base import DATASTORES, Datastore, Estimate
from datastore.records import OutcomeRecord, read_outcomes

__all__ = ["DATASTORES", "Datastore", "Estimate", "OutcomeRecord", "read_outcomes"]

# Importing the module registers the implementation.
from datastore import store as _store  # noqa: E402,F401
