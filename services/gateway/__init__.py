"""Graft's front door: the Open Inference Protocol v2 (KServe v2 / Triton) over HTTP/REST and gRPC.

Phones and standard clients (``tritonclient``, KServe's SDK, ``curl``, load tools) speak OIP v2 to the
gateway; it turns every request into Graft requests on ``graft:ingress`` like any producer (one
``common.client.GraftClient`` per process) and their replies into the response. Redis is never exposed.
``python -m services.gateway`` runs one process; run as many as you like (each its own ports or
container): they share nothing but Redis.

Endpoints
=========
HTTP on ``GRAFT_GATEWAY_HOST``:``GRAFT_GATEWAY_HTTP_PORT`` (default 127.0.0.1:8000), gRPC service
``inference.GRPCInferenceService`` on ``GRAFT_GATEWAY_GRPC_PORT`` (default 8001).

==================================================  ==========================  ===========================
HTTP                                                gRPC                        answer
==================================================  ==========================  ===========================
``GET /v2/health/live``                             ``ServerLive``              200 / ``live=true`` while the process runs
``GET /v2/health/ready``                            ``ServerReady``             200 / ``ready=true`` once a published plan
                                                                                serves a model; else 400 / ``false``
``GET /v2``                                         ``ServerMetadata``          ``{"name": "graft", "version", "extensions"}``
``GET /v2/models/{m}[/versions/1]``                 ``ModelMetadata``           the model's inputs and output (below); 404
``GET /v2/models/{m}[/versions/1]/ready``           ``ModelReady``              200 / ``true`` iff the plan serves ``m``
``POST /v2/models/{m}[/versions/1]/infer``          ``ModelInfer``              the output, or an error (table below)
==================================================  ==========================  ===========================

Models are the ones the current plan serves (the gateway follows ``graft:{plan}``); each has one version,
``1``. Every other gRPC method answers ``UNIMPLEMENTED``; extensions: ``binary_tensor_data``,
``parameters``, ``schedule_policy`` (its ``timeout`` parameter only).

Inputs: one per cut
===================
A model's metadata lists **one input per cut**: ``cut_0 .. cut_{N-1}``, datatype ``FP32``, shape
``[-1, *cut_shape]`` — the tensor the device holds after running blocks ``0..c-1``, at the served
resolution (``GRAFT_RESOLUTION``). ``cut_0`` is the image itself, so its shape tells the resolution.
The output is ``logits``, ``[-1, 1000]``. Without Python::

    $ curl -s localhost:8000/v2/models/resnet18
    {"name":"resnet18","versions":["1"],"platform":"graft",
     "inputs":[{"name":"cut_0","datatype":"FP32","shape":[-1,3,224,224]},
               {"name":"cut_1","datatype":"FP32","shape":[-1,64,112,112]}, ...
               {"name":"cut_13","datatype":"FP32","shape":[-1,512,1,1]}],
     "outputs":[{"name":"logits","datatype":"FP32","shape":[-1,1000]}]}
    $ curl -s localhost:8000/v2/models/resnet18 | jq -c '.inputs[] | [.name, .shape]'

Every cut is listed; a cut the current plan does not serve is refused per request (``BAD_CUT``).

Inference
=========
A request names **exactly one input**, the cut it uploads. Its first dimension is a batch: **each row
becomes one Graft request**; all rows are submitted at once and answered together, output row ``i``
for input row ``i``. If any row fails, the request fails with **the first failed row's error** (in
row order; the message says ``row i of B``) and no partial output — as one batched model call would.
At most 1024 rows; the body at most ``GRAFT_MAX_TENSOR_BYTES`` plus 1 MiB.

Data travels as JSON (``"data"``: flat or nested, row-major) or with the binary tensor data extension:
header ``Inference-Header-Content-Length: N``, the first N bytes JSON, then each input whose
``parameters.binary_data_size`` is set, in order (little-endian float32, C order). The output is binary
when ``outputs[i].parameters.binary_data`` is true or the request sets ``parameters.binary_data_output``
(what tritonclient does when no output is named): then the response is ``application/octet-stream``
with its JSON length in ``Inference-Header-Content-Length``. gRPC takes ``raw_input_contents`` (what
tritonclient sends) or ``contents.fp32_contents`` and answers with ``raw_output_contents``.

The server budget (Graft's ``budget_ms``, design section 6) comes from the request's parameters, the
first of:

1. ``budget_ms`` — the server-side budget in ms;
2. ``timeout`` — µs, the schedule-policy extension (``tritonclient ... infer(..., timeout=)``; 0 = none);
3. ``slo_ms`` and optionally ``device_ms`` — budget = ``slo_ms - device_ms``, as the SDK computes it;
4. otherwise ``GRAFT_DEFAULT_BUDGET_MS`` (1000), or the gRPC deadline when that is shorter.

The ingress checks the range (> 0, at most ``GRAFT_MAX_SLO_MS``) as for any producer. The gateway waits
up to the budget plus 1 s (and never past a gRPC deadline); a client that disconnects or whose deadline
passes stops the wait at once and leaves nothing pending (a late reply is dropped). Other parameters
(``priority``, ``sequence_id``, …) are ignored.

Response ``parameters`` carry Graft's facts: ``server_ms`` (the slowest row's time on the server),
``epoch`` (plan epoch), ``group`` (serving group; several comma-separated), ``batch`` (the largest batch
a row ran in), and ``timings`` (one row: JSON object of where its server time went) or ``rows`` (several
rows: JSON list of each row's ``server_ms``, ``epoch``, ``group``, ``batch``, ``timings``)::

    $ curl -s localhost:8000/v2/models/resnet18/infer -d '{"inputs": [{"name": "cut_13",
        "shape": [1, 512, 1, 1], "datatype": "FP32", "data": [0.5, ...512 numbers...]}],
        "parameters": {"budget_ms": 200}}'
    {"model_name":"resnet18","model_version":"1","parameters":{"server_ms":3.1,"epoch":1,"group":"g0",
     "batch":1,"timings":"{\\"ingress_ms\\":0.4,...}"},"outputs":[{"name":"logits","datatype":"FP32",
     "shape":[1,1000],"data":[...]}]}

With NVIDIA's client (``pip install tritonclient[http,grpc]``)::

    import numpy as np, tritonclient.http as httpclient   # tritonclient.grpc: same calls, port 8001
    c = httpclient.InferenceServerClient("localhost:8000")
    x = np.random.rand(4, 512, 1, 1).astype(np.float32)   # four phones' uploads at cut 13
    inp = httpclient.InferInput("cut_13", list(x.shape), "FP32")
    inp.set_data_from_numpy(x, binary_data=True)
    res = c.infer("resnet18", [inp], parameters={"budget_ms": 150.0})
    logits = res.as_numpy("logits")                         # (4, 1000)
    print(res.get_response()["parameters"]["server_ms"])

Errors
======
HTTP errors are JSON, ``{"error": "CODE: message", "code": CODE, "details": {...}}`` (OIP asks for
``error``; ``code`` and ``details`` are Graft's additions). gRPC aborts with the status below and the
same ``CODE: message``.

=================  =====  ==================  =============================================================
code               HTTP   gRPC                when
=================  =====  ==================  =============================================================
INVALID_REQUEST    400    INVALID_ARGUMENT    malformed body or parameters, not one input, unknown input or
                                              output name, body over the limit; the ingress: budget out of
                                              range, tensor over GRAFT_MAX_TENSOR_BYTES
BAD_TENSOR         400    INVALID_ARGUMENT    datatype not FP32, shape not ``[B, *cut_shape]`` (``details.
                                              expected``/``got``), data length off; the ingress likewise
BAD_CUT            400    INVALID_ARGUMENT    the plan serves no group at or below this cut
NOT_FOUND /        404    NOT_FOUND           model (or version) not served by the current plan
UNKNOWN_MODEL
OVERLOADED         429    RESOURCE_EXHAUSTED  the group's backlog would make it miss its budget; HTTP
                                              ``Retry-After`` (s, rounded up), gRPC trailing metadata
                                              ``retry-after-ms``, and ``details.retry_after_ms``
DEADLINE_EXCEEDED  504    DEADLINE_EXCEEDED   Graft could not finish within the budget
TIMEOUT            504    DEADLINE_EXCEEDED   the gateway's own wait (budget + 1 s) ran out: a stalled system
INTERNAL           500    INTERNAL            a server fault (also any reply code this gateway does not know)
UNAVAILABLE        503    UNAVAILABLE         no plan published yet, Redis unreachable, gateway stopping
=================  =====  ==================  =============================================================

Operations
==========
``python -m services.gateway --check`` exits 0 iff this instance is alive; ``/metrics``, ``/healthz``,
``/readyz`` on ``GRAFT_METRICS_PORT + 3``: ``graft_gateway_requests_total{protocol,outcome}``,
``graft_gateway_latency_ms{protocol}``, ``graft_gateway_in_flight{protocol}``, ``graft_gateway_pending``
(rows awaiting a reply). SIGTERM: both servers stop accepting, calls in flight get 5 s.
``graft bench gateway`` measures the added latency over the SDK path and one process's throughput.

Choices
=======
* **HTTP: aiohttp.** Measured on this 2-core host against uvicorn + Starlette (httptools, uvloop) with
  the same binary-infer handler: 121–140 µs vs 123–162 µs of server CPU per request — a tie within the
  host's noise. aiohttp wins on the rest: one package instead of three, already what tritonclient's
  asyncio HTTP client needs, and ``handler_cancellation`` cancels the handler of a client that
  disconnected (Starlette would need a disconnect poller of our own).
* **gRPC: grpcio's asyncio server with the published stubs as NVIDIA ships them** —
  ``tritonclient.grpc.service_pb2`` / ``service_pb2_grpc``, generated from Triton's
  ``grpc_service.proto`` (https://github.com/triton-inference-server/common/blob/main/protobuf/grpc_service.proto,
  BSD-3-Clause; KServe's open_inference_grpc.proto is its subset, same package and field numbers) with
  protobuf 6.33.5, pinned through ``tritonclient[grpc]>=2.73,<3``. Not a protoc run of our own: any
  generated module of package ``inference`` collides with tritonclient's in protobuf's default
  descriptor pool ("duplicate symbol 'inference.ServerLiveRequest'"), so the gateway could not be
  imported by any process that also uses tritonclient's gRPC client — the tests, ``graft bench``, a
  load generator. Sharing the client's stubs also makes the schema the clients use the schema served.
"""
