"""Helpers for Stagehand stages written in Python (componentize-py, world `stage` of
wit/pipeline.wit): stage errors, settings, and outbound HTTP through the standard
`wasi:http/outgoing-handler`, which reaches only the hosts the pipeline file grants the stage
(`allowed_hosts`).

Build a stage with this file on the module path:
`componentize-py -d wit -w stage componentize -p . -p <dir of this file> app -o stage.wasm`.

    from stagehand_sdk import fatal, request, setting

    reply = request("GET", setting("facts_url") + "?q=pet",
                    headers={"authorization": "Bearer {{secret:FACTS_KEY}}"})
    facts = reply.json()["facts"]

A secret is written as a `{{secret:NAME}}` placeholder in a header value; the host fills it in
for the hosts the secret is bound to, and the guest never sees its value. The host answers a
request from the stage's journal when the stage runs again (a stage waiting on a request holds
no instance: it is run again from its start once the answer is in), so make the same requests
in the same order given the same input.
"""

import json
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple
from urllib.parse import urlsplit

from componentize_py_types import Err, Ok
from wit_world.imports import config, outgoing_handler, streams
from wit_world.imports import stagehand_pipeline_types as types
from wit_world.imports import wasi_http_types as http

READ_SIZE = 64 * 1024


def fatal(message: str) -> Err:
    """An error that fails the item: trying again cannot help."""
    return Err(types.StageError_Fatal(message))


def retryable(message: str) -> Err:
    """An error the host may retry, with back-off, as the pipeline file says."""
    return Err(types.StageError_Retryable(message))


def setting(name: str, default: Optional[str] = None) -> str:
    """The stage setting `name` (`[stage.config]`); without a default, a missing one fails
    the item with an error that names it."""
    try:
        return config.get(name)
    except Err:
        if default is not None:
            return default
        raise fatal(f"the stage needs the setting `{name}`")


class HttpError(Exception):
    """A request that got no response; `code` is the `wasi:http` error-code, e.g.
    `ErrorCode_HttpRequestDenied` for a destination outside `allowed_hosts`."""

    def __init__(self, message: str, code: object = None):
        super().__init__(message)
        self.code = code

    def stage_error(self) -> Err:
        return retryable(f"outbound request failed: {self}")


@dataclass
class Response:
    status: int
    headers: List[Tuple[str, bytes]] = field(default_factory=list)
    body: bytes = b""

    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def json(self):
        try:
            return json.loads(self.body)
        except ValueError as error:
            raise fatal(f"the response (status {self.status}) is not JSON: {error}")

    def header(self, name: str) -> Optional[str]:
        """The first value of header `name` (case-insensitive), as text."""
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value.decode("utf-8", errors="replace")
        return None


_METHODS = {
    "GET": http.Method_Get,
    "HEAD": http.Method_Head,
    "POST": http.Method_Post,
    "PUT": http.Method_Put,
    "DELETE": http.Method_Delete,
    "PATCH": http.Method_Patch,
    "OPTIONS": http.Method_Options,
}


def request(
    method: str,
    url: str,
    headers: Optional[Dict[str, str]] = None,
    body: bytes = b"",
) -> Response:
    """Send a request and read the whole response; raises `HttpError` when there is none."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise HttpError(f"not an http(s) URL: {url!r}")
    fields = http.Fields.from_list(
        [(name, value.encode()) for name, value in (headers or {}).items()]
    )
    outgoing = http.OutgoingRequest(fields)
    verb = method.upper()
    outgoing.set_method(_METHODS[verb]() if verb in _METHODS else http.Method_Other(verb))
    outgoing.set_scheme(http.Scheme_Http() if parts.scheme == "http" else http.Scheme_Https())
    outgoing.set_authority(parts.netloc)
    outgoing.set_path_with_query((parts.path or "/") + (f"?{parts.query}" if parts.query else ""))
    outgoing_body = outgoing.body()
    # Sent first, then the body written: the host reads it as it comes.
    try:
        future = outgoing_handler.handle(outgoing, None)
    except Err as error:
        raise HttpError(_describe(error.value), error.value)
    with outgoing_body.write() as stream:
        for start in range(0, len(body), 4096):
            stream.blocking_write_and_flush(body[start : start + 4096])
    http.OutgoingBody.finish(outgoing_body, None)

    with future.subscribe() as ready:
        ready.block()
    answer = future.get()
    future.__exit__(None, None, None)
    if answer is None or isinstance(answer, Err):
        raise HttpError("no response")
    if isinstance(answer.value, Err):
        raise HttpError(_describe(answer.value.value), answer.value.value)
    response = answer.value.value
    status = response.status()
    with response.headers() as fields:
        reply_headers = fields.entries()
    incoming = response.consume()
    chunks = []
    with incoming.stream() as stream:
        while True:
            try:
                chunks.append(stream.blocking_read(READ_SIZE))
            except Err as error:
                if isinstance(error.value, streams.StreamError_Closed):
                    break
                raise HttpError(f"reading the response: {error.value.value.to_debug_string()}")
    http.IncomingBody.finish(incoming).__exit__(None, None, None)
    response.__exit__(None, None, None)
    return Response(status, reply_headers, b"".join(chunks))


def _describe(code: object) -> str:
    if isinstance(code, http.ErrorCode_HttpRequestDenied):
        return "HttpRequestDenied: the host refused the destination (not in the stage's `allowed_hosts`)"
    return type(code).__name__.removeprefix("ErrorCode_")
