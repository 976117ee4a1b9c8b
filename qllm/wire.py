"""Conventions between router and worker that the protos do not spell out."""

# The rejection message a draining worker answers new work with; the router re-queues such a request on
# another worker instead of failing it, and stops sending that worker work.
DRAINING = "worker draining: not taking new requests"
