"""The contract between the parts: the wire format, every key name, the error codes, the plan as routed.

Everything a producer, the ingress, the workers and the planner must agree on lives here and only
here: ``wire`` (msgpack envelopes: request, reply, plan, stats), ``keys`` (every Redis key and stream
name), ``errors`` (the one error hierarchy, whose codes are the reply codes) and ``routing`` (the
plan as the data plane reads it). The producer protocol is documented in ``services/ingress``.
"""
