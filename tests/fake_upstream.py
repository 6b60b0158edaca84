"""An in-process fake OpenAI-compatible server (aiohttp, port 0) for fast proxy tests.

Answers are a pure function of the request, so the same request sent directly and through
the proxy gets byte-identical answers. Behaviour is steered by request headers:

    x-fake-delay: SECONDS     wait between stream events (and before a non-stream reply)
    x-fake-status: CODE       answer with this HTTP status and an OpenAI error body
    x-fake-hang: 1            never answer
    x-fake-cut: N             close the connection after N stream events
    x-fake-drop: SECONDS      close the connection, unanswered, after that long (a server dying)
    x-fake-events: N          number of content events in a stream (default 5)
    x-fake-size: BYTES        pad a non-stream reply's content to about this size
    x-fake-stream-error: 1    end a stream with an error event before [DONE], as vLLM does when
                              generation fails after the headers went out

Given tools, a chat or responses call asks for one (arguments filled from its schema). An
agent framework cannot send headers, so its loop is steered by the model name: with model
`fake-agent-N`, the answer asks for the next tool (in turn) until the conversation holds N tool
results, and then answers in text, as an agent that has what it needs; with
`fake-parallel-agent-N`, it asks for every tool at once (parallel calls) until then.

`/echo` answers with what arrived (method, path, query, headers, body digest and length).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import socket

from aiohttp import web

CREATED = 1_700_000_000


def _digest(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()[:24]


def _words(body: bytes, n: int) -> list[str]:
    h = hashlib.sha256(body).hexdigest()
    return [f"w{h[i % 60:i % 60 + 4]} " for i in range(n)]


_SAMPLE = {"string": "the booking the customer made on the twelfth of May", "integer": 1, "number": 1, "boolean": True, "array": [], "object": {}}


def _next_tools(req: dict, results: int) -> list[tuple[str, str]]:
    """The tools a call asks for (name, arguments JSON); none: it answers in text.

    `results` is how many tool results the conversation holds."""
    tools = [t.get("function", t) for t in req.get("tools") or [] if isinstance(t, dict)]
    agent = re.fullmatch(r"fake-(parallel-)?agent-(\d+)", str(req.get("model", "")))
    if not tools or (agent and results >= int(agent.group(2))):
        return []
    asked = tools if agent and agent.group(1) else [tools[results % len(tools)]]
    out = []
    for tool in asked:
        props = (tool.get("parameters") or {}).get("properties") or {}
        args = {k: _SAMPLE.get(v.get("type"), "x") if isinstance(v, dict) else "x"
                for k, v in props.items()}
        out.append((str(tool.get("name")), json.dumps(args)))
    return out


def _call_id(body: bytes, i: int) -> str:
    return "call_" + _digest(body)[:8] + (f"_{i}" if i else "")


def _halves(text: str) -> tuple[str, str]:
    return text[:len(text) // 2], text[len(text) // 2:]


class FakeUpstream:
    def __init__(self) -> None:
        self.app = web.Application(client_max_size=1024**3)
        self.app.router.add_post("/v1/chat/completions", self.chat)
        self.app.router.add_post("/v1/completions", self.completions)
        self.app.router.add_post("/v1/responses", self.responses)
        self.app.router.add_post("/v1/embeddings", self.embeddings)
        self.app.router.add_get("/v1/models", self.models)
        self.app.router.add_get("/metrics", self.metrics)
        self.app.router.add_route("*", "/echo{tail:.*}", self.echo)
        self.runner: web.AppRunner | None = None
        self.port = 0
        self.requests = 0
        self.cancelled = 0
        self.priorities: list = []
        """The vLLM `priority` field of each JSON request received (None where absent)."""
        self.xargs: list = []
        """Each request's `vllm_xargs` (None where it had none)."""
        self.last_headers: dict[str, str] = {}
        self.metrics_page: str | None = None
        """What GET /metrics answers, as a vLLM server's Prometheus page (None: 404, as a
        server without metrics)."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> "FakeUpstream":
        self.runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None)
        await self.runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        site = web.SockSite(self.runner, sock)
        await site.start()
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    # -- helpers -------------------------------------------------------------------------

    async def _prologue(self, request: web.Request) -> tuple[bytes, dict | None, web.Response | None]:
        self.requests += 1
        self.last_headers = dict(request.headers)
        body = await request.read()
        if request.headers.get("x-fake-hang"):
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.cancelled += 1
                raise
        drop = float(request.headers.get("x-fake-drop", "0"))
        if drop:
            await asyncio.sleep(drop)
            assert request.transport is not None
            request.transport.close()
            return body, None, web.Response(status=500)  # never reaches the client
        status = int(request.headers.get("x-fake-status", "200"))
        if status != 200:
            err = {"error": {"message": f"fake failure {status}", "type": "fake", "code": status}}
            return body, None, web.json_response(err, status=status)
        try:
            parsed = json.loads(body)
        except (ValueError, RecursionError):
            err = {"error": {"message": "body is not JSON", "type": "invalid_request_error",
                             "code": None}}
            return body, None, web.json_response(err, status=400)
        if not isinstance(parsed, dict):
            err = {"error": {"message": "body must be an object", "type": "invalid_request_error",
                             "code": None}}
            return body, None, web.json_response(err, status=400)
        wrong = [k for k, kind in (("messages", list), ("tools", list), ("stream_options", dict))
                 if parsed.get(k) is not None and not isinstance(parsed[k], kind)]
        if wrong:  # as vLLM's request validation answers
            err = {"error": {"message": f"{wrong[0]} has the wrong type",
                             "type": "invalid_request_error", "code": None}}
            return body, None, web.json_response(err, status=400)
        self.priorities.append(parsed.get("priority"))
        self.xargs.append(parsed.get("vllm_xargs"))
        return body, parsed, None

    async def _sse(self, request: web.Request, events: list[str]) -> web.StreamResponse:
        delay = float(request.headers.get("x-fake-delay", "0"))
        cut = int(request.headers.get("x-fake-cut", "-1"))
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                          "Cache-Control": "no-cache"})
        await out.prepare(request)
        try:
            for i, ev in enumerate(events):
                if i == cut:
                    assert request.transport is not None
                    request.transport.close()
                    return out
                if delay and i:
                    await asyncio.sleep(delay)
                await out.write(ev.encode())
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        await out.write_eof()
        return out

    def _usage(self, body: bytes, n: int) -> dict:
        return {"prompt_tokens": len(body) // 4, "completion_tokens": n,
                "total_tokens": len(body) // 4 + n,
                "prompt_tokens_details": {"cached_tokens": 0}}

    # -- routes --------------------------------------------------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body, req, err = await self._prologue(request)
        if err is not None:
            return err
        assert req is not None
        n = int(request.headers.get("x-fake-events", "5"))
        words = _words(body, n)
        cid = "chatcmpl-" + _digest(body)
        model = req.get("model", "fake")
        messages = [m for m in req.get("messages") or [] if isinstance(m, dict)]
        calls = _next_tools(req, sum(m.get("role") == "tool" for m in messages))
        if not req.get("stream"):
            await asyncio.sleep(float(request.headers.get("x-fake-delay", "0")))
            content = "".join(words)
            size = int(request.headers.get("x-fake-size", "0"))
            if size:
                content = (content * (size // max(len(content), 1) + 1))[:size]
            message: dict = {"role": "assistant", "content": content, "refusal": None}
            if calls:
                message["content"] = None
                message["tool_calls"] = [
                    {"id": _call_id(body, i), "type": "function",
                     "function": {"name": name, "arguments": args}}
                    for i, (name, args) in enumerate(calls)]
            return web.json_response({
                "id": cid, "object": "chat.completion", "created": CREATED, "model": model,
                "choices": [{"index": 0, "message": message, "logprobs": None,
                             "finish_reason": "tool_calls" if calls else "stop"}],
                "usage": self._usage(body, n),
            })

        def chunk(delta: dict, finish=None, usage=None) -> str:
            obj = {"id": cid, "object": "chat.completion.chunk", "created": CREATED,
                   "model": model, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                "finish_reason": finish}]}
            if usage is not None:
                obj["choices"] = []
                obj["usage"] = usage
            return f"data: {json.dumps(obj)}\n\n"

        events = [chunk({"role": "assistant", "content": ""})]
        for i, (name, args) in enumerate(calls):
            events.append(chunk({"tool_calls": [{"index": i, "id": _call_id(body, i),
                                                 "type": "function",
                                                 "function": {"name": name, "arguments": ""}}]}))
            for piece in _halves(args):
                events.append(chunk({"tool_calls": [{"index": i,
                                                     "function": {"arguments": piece}}]}))
        if calls:
            events.append(chunk({}, "tool_calls"))
        else:
            events += [chunk({"content": w}) for w in words]
            events.append(chunk({}, "stop"))
        if (req.get("stream_options") or {}).get("include_usage"):
            events.append(chunk({}, usage=self._usage(body, n)))
        if request.headers.get("x-fake-stream-error"):  # as vLLM reports a failed generation
            error = {"error": {"message": "generation failed", "type": "InternalServerError",
                               "param": None, "code": 500}}
            events[-1:] = [f"data: {json.dumps(error)}\n\n"]
        events.append("data: [DONE]\n\n")
        return await self._sse(request, events)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body, req, err = await self._prologue(request)
        if err is not None:
            return err
        assert req is not None
        n = int(request.headers.get("x-fake-events", "5"))
        words = _words(body, n)
        cid = "cmpl-" + _digest(body)
        model = req.get("model", "fake")
        if not req.get("stream"):
            return web.json_response({
                "id": cid, "object": "text_completion", "created": CREATED, "model": model,
                "choices": [{"index": 0, "text": "".join(words), "logprobs": None,
                             "finish_reason": "length"}],
                "usage": self._usage(body, n)})
        events = [
            "data: " + json.dumps({"id": cid, "object": "text_completion", "created": CREATED,
                                   "model": model, "choices": [{"index": 0, "text": w,
                                                                "finish_reason": None}]}) + "\n\n"
            for w in words
        ] + ["data: [DONE]\n\n"]
        return await self._sse(request, events)

    async def responses(self, request: web.Request) -> web.StreamResponse:
        body, req, err = await self._prologue(request)
        if err is not None:
            return err
        assert req is not None
        n = int(request.headers.get("x-fake-events", "5"))
        words = _words(body, n)
        d = _digest(body)
        items = req.get("input") if isinstance(req.get("input"), list) else []
        items = [i for i in items if isinstance(i, dict)]
        calls = _next_tools(req, sum(i.get("type") == "function_call_output" for i in items))
        output = [{"type": "function_call", "id": "fc" + _call_id(body, i)[4:],
                   "call_id": _call_id(body, i), "name": name, "arguments": args,
                   "status": "completed"} for i, (name, args) in enumerate(calls)]
        if not calls:
            output = [{"type": "message", "id": "msg_" + d[:8], "role": "assistant",
                       "status": "completed",
                       "content": [{"type": "output_text", "text": "".join(words),
                                    "annotations": []}]}]
        final = {
            "id": "resp_" + d, "object": "response", "created_at": CREATED, "status": "completed",
            "model": req.get("model", "fake"), "output": output,
            "usage": {"input_tokens": len(body) // 4, "output_tokens": n,
                      "total_tokens": len(body) // 4 + n,
                      "input_tokens_details": {"cached_tokens": 0}},
        }
        if not req.get("stream"):
            return web.json_response(final)
        events: list[str] = []

        def event(kind: str, **fields) -> None:
            data = {"type": kind, "sequence_number": len(events), **fields}
            events.append(f"event: {kind}\ndata: {json.dumps(data)}\n\n")

        event("response.created", response=dict(final, status="in_progress", output=[]))
        for i, item in enumerate(output if calls else []):
            event("response.output_item.added", output_index=i,
                  item=dict(item, arguments="", status="in_progress"))
            for piece in _halves(item["arguments"]):
                event("response.function_call_arguments.delta", item_id=item["id"],
                      output_index=i, delta=piece)
            event("response.function_call_arguments.done", item_id=item["id"], output_index=i,
                  arguments=item["arguments"])
            event("response.output_item.done", output_index=i, item=item)
        if not calls:
            for w in words:
                event("response.output_text.delta", item_id="msg", output_index=0,
                      content_index=0, delta=w)
        event("response.completed", response=final)
        return await self._sse(request, events)

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        body, req, err = await self._prologue(request)
        if err is not None:
            return err
        vec = [int(c, 16) / 15 for c in _digest(body)[:8]]
        return web.json_response({"object": "list", "model": "fake-embed",
                                  "data": [{"object": "embedding", "index": 0, "embedding": vec}],
                                  "usage": {"prompt_tokens": 3, "total_tokens": 3}})

    async def models(self, request: web.Request) -> web.Response:
        self.requests += 1
        return web.json_response({"object": "list", "data": [
            {"id": "fake", "object": "model", "created": CREATED, "owned_by": "preheat-tests"}]})

    async def metrics(self, request: web.Request) -> web.Response:
        if self.metrics_page is None:
            raise web.HTTPNotFound()
        return web.Response(text=self.metrics_page, content_type="text/plain")

    async def echo(self, request: web.Request) -> web.Response:
        self.requests += 1
        body = await request.read()
        status = int(request.headers.get("x-fake-status", "200"))
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in ("host", "content-length", "connection")}
        return web.json_response(
            {"method": request.method, "path": request.path, "query": request.query_string,
             "headers": headers, "length": len(body), "digest": _digest(body)},
            status=status, headers={"X-Echo": "1", "Set-Cookie": "fake=1"},
        )


def main() -> None:
    """`python -m tests.fake_upstream PORT`: serve the fake on a port (benchmarks)."""
    import sys

    fake = FakeUpstream()
    web.run_app(fake.app, host="127.0.0.1", port=int(sys.argv[1]), print=None,
                access_log=None, handler_cancellation=True)


if __name__ == "__main__":
    main()
