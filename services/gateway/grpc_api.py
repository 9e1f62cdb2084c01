"""OIP v2 over gRPC: ``inference.GRPCInferenceService`` on grpcio's asyncio server, for one ``FrontDoor``.

The message classes and the servicer base are the stubs NVIDIA generates from Triton's published
``grpc_service.proto`` and ships in the ``tritonclient`` wheel (``tritonclient.grpc.service_pb2`` and
``service_pb2_grpc``; see the package docstring for why these rather than our own protoc run).
Implemented: ``ServerLive``, ``ServerReady``, ``ModelReady``, ``ServerMetadata``, ``ModelMetadata``,
``ModelInfer``; every other method answers ``UNIMPLEMENTED`` (the generated base class does that).

Errors abort the call with ``mapping.GRPC_STATUS`` of their code and the message ``CODE: message``;
``RESOURCE_EXHAUSTED`` carries the trailing metadata ``retry-after-ms``. A client deadline bounds the
gateway's wait (and, without an explicit budget, the budget); when the client cancels or its deadline
passes, grpcio cancels the handler and with it every row's wait.
"""

from __future__ import annotations

from typing import Any

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from common import logs
from services.gateway.frontdoor import FrontDoor, InferCall, InputTensor
from services.gateway.mapping import FP32, OUTPUT_NAME, Answer, GatewayError, invalid

log = logs.get_logger("graft.gateway")

PROTOCOL = "grpc"
MESSAGE_SLACK_BYTES = 1 << 20


def parameter_value(p: Any) -> Any:
    """The Python value of an ``InferParameter`` (bool, int, str or float); None when unset."""
    kind = p.WhichOneof("parameter_choice")
    return None if kind is None else getattr(p, kind)


def set_parameter(p: Any, value: bool | int | float | str) -> None:
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        p.int64_param = value
    elif isinstance(value, float):
        p.double_param = value
    else:
        p.string_param = str(value)


def call_of(request: Any, deadline_s: float | None) -> InferCall:
    """The ``InferCall`` of a ``ModelInferRequest``: raw contents (what tritonclient sends) or typed ones."""
    raws = request.raw_input_contents
    if raws and len(raws) != len(request.inputs):
        raise invalid(f"{len(raws)} raw_input_contents for {len(request.inputs)} inputs")
    inputs = []
    for i, t in enumerate(request.inputs):
        shape = list(t.shape)
        if raws:
            inputs.append(InputTensor(t.name, t.datatype, shape, raw=raws[i]))
        elif t.HasField("contents"):
            inputs.append(InputTensor(t.name, t.datatype, shape, values=list(t.contents.fp32_contents)))
        else:
            inputs.append(InputTensor(t.name, t.datatype, shape))
    params = {k: parameter_value(v) for k, v in request.parameters.items()}
    return InferCall(request.model_name, request.model_version, inputs, params, [o.name for o in request.outputs],
                     deadline_s)


def response_of(call: InferCall, request_id: str, ans: Answer) -> Any:
    resp = pb.ModelInferResponse(model_name=call.model, model_version="1", id=request_id)
    for key, value in ans.parameters.items():
        set_parameter(resp.parameters[key], value)
    out = resp.outputs.add()
    out.name, out.datatype = OUTPUT_NAME, FP32
    out.shape.extend(ans.output.shape)
    resp.raw_output_contents.append(ans.output.astype("<f4", copy=False).tobytes())
    return resp


class GrpcApi(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    def __init__(self, door: FrontDoor) -> None:
        self.door = door
        self._server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0: a free port); returns the port."""
        limit = self.door.settings.max_tensor_bytes + MESSAGE_SLACK_BYTES
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", limit),
                                          ("grpc.max_send_message_length", limit),
                                          ("grpc.so_reuseport", 0)])
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(self, server)
        addr = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.port = server.add_insecure_port(addr)
        if not self.port:
            raise OSError(f"gRPC could not listen on {addr}")
        await server.start()
        self._server = server
        return self.port

    async def stop(self, grace_s: float = 5.0) -> None:
        if self._server is not None:
            await self._server.stop(grace_s)  # no new calls; calls in flight get grace_s to finish
            self._server = None

    @staticmethod
    async def _abort(context: grpc.aio.ServicerContext, exc: GatewayError) -> None:
        trailing: tuple[tuple[str, str], ...] = ()
        if exc.retry_after_ms is not None:
            trailing = (("retry-after-ms", str(exc.retry_after_ms)),)
        await context.abort(exc.grpc_status, exc.text(), trailing_metadata=trailing)

    # ------------------------------------------------------------------------ health and metadata

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerReadyResponse(ready=self.door.ready)

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ModelReadyResponse(ready=self.door.model_ready(request.name, request.version))

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        meta = self.door.server_metadata()
        return pb.ServerMetadataResponse(name=meta["name"], version=meta["version"], extensions=meta["extensions"])

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            meta = self.door.signature(request.name, request.version).metadata()
        except GatewayError as exc:
            await self._abort(context, exc)
            raise  # not reached: abort raises
        tensors = [[pb.ModelMetadataResponse.TensorMetadata(name=t["name"], datatype=t["datatype"], shape=t["shape"])
                    for t in meta[kind]] for kind in ("inputs", "outputs")]
        return pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                                        inputs=tensors[0], outputs=tensors[1])

    # -------------------------------------------------------------------------------- inference

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            with self.door.tracked(PROTOCOL):
                self.door.signature(request.model_name, request.model_version)
                call = call_of(request, context.time_remaining())
                try:
                    ans = await self.door.infer(call)
                except GatewayError:
                    raise
                except Exception as exc:  # a fault of the gateway itself
                    log.exception("gateway_request_failed", protocol=PROTOCOL, model=request.model_name)
                    raise GatewayError("INTERNAL", f"gateway fault: {type(exc).__name__}: {exc}") from exc
                return response_of(call, request.id, ans)
        except GatewayError as exc:
            await self._abort(context, exc)
            raise  # not reached: abort raises
