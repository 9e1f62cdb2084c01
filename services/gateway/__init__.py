"""Graft's front door: the Open Inference Protocol v2 (KServe v2 / Triton) over HTTP/REST and gRPC.

(Reference documentation follows with the package's first complete version.)
"""
