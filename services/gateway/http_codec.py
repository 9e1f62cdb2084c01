"""OIP v2 over HTTP/REST: the JSON inference request and response, with the binary tensor data extension.

Pure functions over bytes (the aiohttp handlers in ``http_api`` only move bytes in and out):

* a request body is JSON, or — with the ``Inference-Header-Content-Length: N`` header — N bytes of
  JSON followed by the binary section; an input whose ``parameters.binary_data_size`` is set takes
  that many bytes from the binary section, in input order; all of it must be used;
* the output is binary when its ``parameters.binary_data`` is true, or when the request's
  ``parameters.binary_data_output`` is true (what tritonclient sends when no output is named): then
  the response is ``application/octet-stream``, its JSON header (length in
  ``Inference-Header-Content-Length``) names ``binary_data_size`` and the raw little-endian float32
  bytes follow; otherwise the response is plain JSON with ``data`` as a flat row-major list.
"""

from __future__ import annotations

import json
from typing import Any

from services.gateway.frontdoor import InferCall, InputTensor
from services.gateway.mapping import FP32, OUTPUT_NAME, Answer, invalid

HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"


def split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], memoryview]:
    """The JSON header and the binary section of a request body."""
    view = memoryview(body)
    if header_length is None:
        n = len(body)
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise invalid(f"{HEADER_LENGTH} must be an integer, got {header_length!r}") from None
        if not 0 < n <= len(body):
            raise invalid(f"{HEADER_LENGTH} {n} is outside the body of {len(body)} bytes")
    try:
        header = json.loads(body if n == len(body) else body[:n])
    except (ValueError, UnicodeDecodeError) as exc:
        raise invalid(f"request is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise invalid("request must be a JSON object")
    return header, view[n:]


def _parameters(obj: dict[str, Any], where: str) -> dict[str, Any]:
    params = obj.get("parameters")
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise invalid(f"{where} 'parameters' must be an object")
    return params


def _binary_size(params: dict[str, Any], name: str) -> int | None:
    size = params.get("binary_data_size")
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise invalid(f"input {name}: binary_data_size must be a non-negative integer")
    return size


def parse_infer(model: str, version: str, header: dict[str, Any], binary: memoryview) -> tuple[InferCall, bool]:
    """The call a request stands for, and whether its output goes back in binary."""
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise invalid("request needs 'inputs': a list with one input, named cut_{c}")
    tensors: list[InputTensor] = []
    offset = 0
    for obj in inputs:
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            raise invalid("each input must be an object with a 'name'")
        name = obj["name"]
        size = _binary_size(_parameters(obj, f"input {name}"), name)
        if size is None:
            tensors.append(InputTensor(name, obj.get("datatype"), obj.get("shape"), values=obj.get("data")))
            continue
        if offset + size > len(binary):
            raise invalid(f"input {name}: binary_data_size {size} runs past the binary section "
                          f"({len(binary) - offset} bytes left)")
        tensors.append(InputTensor(name, obj.get("datatype"), obj.get("shape"), raw=binary[offset:offset + size]))
        offset += size
    if offset != len(binary):
        raise invalid(f"{len(binary) - offset} bytes of binary data after the inputs that declared binary_data_size")
    params = _parameters(header, "request")
    binary_out = params.get("binary_data_output") is True
    outputs = header.get("outputs")
    names: list[str] = []
    if outputs is not None:
        if not isinstance(outputs, list):
            raise invalid("'outputs' must be a list")
        for obj in outputs:
            if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
                raise invalid("each requested output must be an object with a 'name'")
            names.append(obj["name"])
            out_params = _parameters(obj, f"output {obj['name']}")
            if "binary_data" in out_params:
                binary_out = out_params["binary_data"] is True
    call = InferCall(model, version, tensors, params, names)
    return call, binary_out


def encode_infer(model: str, request_id: Any, ans: Answer, binary: bool) -> tuple[bytes, int | None]:
    """A response body, and the JSON header's length when the output is binary (else None)."""
    out: dict[str, Any] = {"name": OUTPUT_NAME, "datatype": FP32, "shape": list(ans.output.shape)}
    raw = b""
    if binary:
        raw = ans.output.astype("<f4", copy=False).tobytes()
        out["parameters"] = {"binary_data_size": len(raw)}
    else:
        out["data"] = ans.output.ravel().tolist()
    resp: dict[str, Any] = {"model_name": model, "model_version": "1"}
    if isinstance(request_id, str) and request_id:
        resp["id"] = request_id
    resp["parameters"] = ans.parameters
    resp["outputs"] = [out]
    head = json.dumps(resp, separators=(",", ":")).encode()
    return (head + raw, len(head)) if binary else (head, None)
