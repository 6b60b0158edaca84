"""Real agent frameworks through the proxy, configured the way their users would: nothing but
`OPENAI_BASE_URL` pointing at preheat.

The OpenAI Agents SDK (its default Responses API, and Chat Completions, streamed), LangChain and
pydantic-ai run tool-calling agents against the fake upstream, whose `fake-agent-N` model asks for a tool
N times and then answers. Each run must end as it does talking straight to the upstream, and
preheat must capture it whole: one session per run, every call linked to the one before, the
API key nowhere on disk, the agent's calls learned as templates and a workflow.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

agents = pytest.importorskip("agents")
langchain_agents = pytest.importorskip("langchain.agents")
langchain_openai = pytest.importorskip("langchain_openai")
pydantic_ai = pytest.importorskip("pydantic_ai")

from agents.models import openai_provider  # noqa: E402
from langchain_openai.chat_models import _client_utils  # noqa: E402

from learn.calls import answer_kind  # noqa: E402
from learn.canonical import message_key  # noqa: E402
from proxy.config import Settings  # noqa: E402

ROUNDS = 2
KEY = "sk-preheat-framework-secret-0042"
TOKEN = "frameworks-admin-token"
INSTRUCTIONS = ("You are the airline's booking assistant. Look the customer up, then read the "
                "booking, then answer in one sentence. ") * 20
TASKS = ["Where is my booking 42?", "Can I move booking 7 to Friday?",
         "Cancel booking 19 please.", "Is booking 88 refundable?"]


@pytest.fixture
def proxy_settings(upstream, tmp_path) -> Settings:
    return Settings(upstream=upstream.url, db=f"sqlite:///{tmp_path}/preheat.db",
                    admin_token=TOKEN)


@pytest.fixture(autouse=True)
async def _environment(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("OPENAI_AGENTS_DISABLE_TRACING", "1")  # nothing leaves the machine
    monkeypatch.delenv("OPENAI_API_BASE", raising=False)
    agents.set_tracing_disabled(True)
    # Both frameworks keep one HTTP client per process, bound to the event loop it was first
    # used on; each test runs on its own loop (a program has one), so each gets its own.
    monkeypatch.setattr(openai_provider, "_http_client", None)
    _client_utils._cached_async_httpx_client.cache_clear()
    yield
    if openai_provider._http_client is not None:
        await openai_provider._http_client.aclose()


def _pointed_at(monkeypatch, url: str) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", url + "/v1")


# -- the frameworks, as their users write them --------------------------------------------

def _tools(ran: list[str]):
    """The agents' two tools, as plain functions each framework wraps its own way."""
    def find_customer(booking: str) -> str:
        """Find the customer who holds a booking."""
        ran.append("find_customer")
        return f"customer C-{booking} (gold tier)"

    def read_booking(booking: str) -> str:
        """Read a booking's flights and fare."""
        ran.append("read_booking")
        return f"booking {booking}: LHR-CDG Friday 09:40, flexible fare"

    return find_customer, read_booking


async def _openai_agents(task: str, api: str, tools_ran: list[str],
                         model: str = f"fake-agent-{ROUNDS}") -> str:
    agent = agents.Agent(name="booking", instructions=INSTRUCTIONS, model=model,
                         tools=[agents.function_tool(f) for f in _tools(tools_ran)])
    # A fresh provider builds its client from the environment, as the default one does once.
    config = agents.RunConfig(model_provider=agents.OpenAIProvider(
        use_responses=api != "chat_completions"))
    if api == "streamed":
        run = agents.Runner.run_streamed(agent, task, run_config=config)
        kinds = [event.type async for event in run.stream_events()]
        assert "raw_response_event" in kinds
        return str(run.final_output)
    result = await agents.Runner.run(agent, task, run_config=config)
    return str(result.final_output)


async def _langchain(task: str, stream: bool, tools_ran: list[str]) -> str:
    from langchain_core.tools import tool

    model = langchain_openai.ChatOpenAI(model=f"fake-agent-{ROUNDS}", streaming=stream,
                                        max_retries=0)
    agent = langchain_agents.create_agent(model, tools=[tool(f) for f in _tools(tools_ran)],
                                          system_prompt=INSTRUCTIONS)
    try:
        state = await agent.ainvoke({"messages": [{"role": "user", "content": task}]})
    finally:  # its shared HTTP client, closed with the event loop's sockets it holds
        await model.root_async_client.close()
        _client_utils._cached_async_httpx_client.cache_clear()
    return str(state["messages"][-1].content)


async def _pydantic_ai(task: str, api: str, tools_ran: list[str]) -> str:
    agent = pydantic_ai.Agent(f"{api}:fake-agent-{ROUNDS}", instructions=INSTRUCTIONS,
                              tools=list(_tools(tools_ran)))
    async with agent:  # closes the HTTP client its provider made
        return str((await agent.run(task)).output)


async def _crew(task: str, tools_ran: list[str]) -> str:
    """A front desk that hands each customer to a specialist (the Agents SDK's hand-offs)."""
    booking = agents.Agent(name="booking", instructions=INSTRUCTIONS, model=f"fake-agent-{ROUNDS}",
                           tools=[agents.function_tool(_tools(tools_ran)[1])])
    refunds = agents.Agent(name="refunds", instructions="You handle refunds. " * 40,
                           model=f"fake-agent-{ROUNDS}")
    desk = agents.Agent(name="desk", model="fake-agent-1", handoffs=[booking, refunds],
                        instructions="You are the airline's front desk. Hand each customer to "
                                     "the right specialist. " * 20)
    config = agents.RunConfig(model_provider=agents.OpenAIProvider())
    result = await agents.Runner.run(desk, task, run_config=config)
    assert result.last_agent is booking
    return str(result.final_output)


async def _manager(task: str, tools_ran: list[str]) -> str:
    """A manager that asks a specialist agent, called as a tool (the Agents SDK's `as_tool`)."""
    booking = agents.Agent(name="booking", instructions=INSTRUCTIONS, model="fake-agent-1",
                           tools=[agents.function_tool(_tools(tools_ran)[1])])
    manager = agents.Agent(
        name="manager", model="fake-agent-1",
        instructions="You are the airline's duty manager: ask the specialists. " * 20,
        tools=[booking.as_tool(tool_name="ask_booking",
                               tool_description="Ask the booking specialist a question.")])
    config = agents.RunConfig(model_provider=agents.OpenAIProvider())
    return str((await agents.Runner.run(manager, task, run_config=config)).final_output)


FRAMEWORKS = {
    "openai-agents responses": lambda task, ran: _openai_agents(task, "responses", ran),
    "openai-agents chat completions":
        lambda task, ran: _openai_agents(task, "chat_completions", ran),
    "openai-agents streamed": lambda task, ran: _openai_agents(task, "streamed", ran),
    "langchain": lambda task, ran: _langchain(task, False, ran),
    "langchain streamed": lambda task, ran: _langchain(task, True, ran),
    # It parses tool calls' arguments and sends them back serialised its own way.
    "pydantic-ai responses": lambda task, ran: _pydantic_ai(task, "openai", ran),
    "pydantic-ai chat completions": lambda task, ran: _pydantic_ai(task, "openai-chat", ran),
}


# -- the tests -------------------------------------------------------------------------------

@pytest.mark.parametrize("framework", list(FRAMEWORKS))
async def test_an_agent_runs_through_preheat_as_it_does_direct(framework, proxy, upstream,
                                                               monkeypatch):
    run = FRAMEWORKS[framework]
    _pointed_at(monkeypatch, upstream.url)
    direct_tools: list[str] = []
    direct = await run(TASKS[0], direct_tools)
    sent_direct = upstream.requests

    _pointed_at(monkeypatch, proxy.url)
    tools: list[str] = []
    answer = await run(TASKS[0], tools)

    assert tools == direct_tools == ["find_customer", "read_booking"]
    assert answer == direct and answer  # the fake's answer is a function of the request bytes
    assert upstream.requests - sent_direct == ROUNDS + 1

    store = await proxy.store()
    [session] = store.sessions()
    calls = list(store.exchanges(session_id=session["id"]))
    assert len(calls) == ROUNDS + 1 and all(c.status == 200 for c in calls)
    assert [c.session_source for c in calls] == ["new"] + ["prefix"] * ROUNDS
    assert [c.parent_id for c in calls[1:]] == [c.id for c in calls[:-1]]
    assert [answer_kind(c.answer) for c in calls] == [
        "tools:find_customer", "tools:read_booking", "text"]
    # The framework's key went upstream but never to disk.
    assert upstream.last_headers.get("Authorization") == f"Bearer {KEY}"
    store.close()
    for path in Path(proxy.db.removeprefix("sqlite:///")).parent.glob("preheat.db*"):
        assert KEY.encode() not in path.read_bytes(), path


@pytest.mark.parametrize("api", ["responses", "chat_completions"])
async def test_parallel_tool_calls_are_one_answer_in_the_session(api, proxy, monkeypatch):
    """Both tools asked for at once: on the Responses API they come back as two items."""
    _pointed_at(monkeypatch, proxy.url)
    ran: list[str] = []
    await _openai_agents(TASKS[1], api, ran, model="fake-parallel-agent-2")
    assert sorted(ran) == ["find_customer", "read_booking"]
    store = await proxy.store()
    [session] = store.sessions()
    first, second = store.exchanges(session_id=session["id"])
    assert second.parent_id == first.id and second.session_source == "prefix"
    assert answer_kind(first.answer) == "tools:find_customer+read_booking"
    assert [m["role"] for m in second.messages][-3:] == ["assistant", "tool", "tool"]
    assert message_key(second.messages[-3]) == message_key(first.answer)  # as it was answered


@pytest.mark.parametrize("framework", ["openai-agents responses", "langchain"])
async def test_an_agent_run_often_is_learned_as_templates_and_a_workflow(framework, proxy,
                                                                         monkeypatch):
    _pointed_at(monkeypatch, proxy.url)
    for task in TASKS:
        await FRAMEWORKS[framework](task, [])
    await proxy.observer.flush()
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(timeout=30) as client:
        templates = (await client.get(proxy.url + "/admin/templates.json", headers=bearer)).json()
        flows = (await client.get(proxy.url + "/admin/workflows.json", headers=bearer)).json()
    # Each step of the loop is one template whatever the customer asked: the first call, and
    # the call after each tool's result, all of one workflow.
    steps = {tuple(t["turn"] or ()): t for t in templates["templates"]}
    assert set(steps) == {(), ("tool:find_customer",), ("tool:read_booking",)}
    assert all(t["calls"] == len(TASKS) and t["prefix_tokens"] > 0 for t in steps.values())
    [flow] = flows["workflows"]
    assert flow["nodes"] == 3 and flow["edges"] == 2
    assert {t["workflow"] for t in steps.values()} == {flow["id"]}


@pytest.mark.parametrize("crew, sessions, steps, edges", [
    # The desk's answer (a call to `transfer_to_booking`) is sent on whole in the
    # specialist's prompt: the hand-off is an edge.
    (_crew, [1] * 4 + [2] * 4,
     [(), ("tool:read_booking",), ("tool:transfer_to_booking",)], 2),
    # The manager's question is the specialist's task, and its answer the manager's tool
    # result: both are edges.
    (_manager, [2] * 8,
     [(), (), ("tool:ask_booking",), ("tool:read_booking",)], 4),
], ids=["hand-off", "agent as a tool"])
async def test_a_crew_is_learned_as_one_workflow(crew, sessions, steps, edges, proxy,
                                                 monkeypatch):
    _pointed_at(monkeypatch, proxy.url)
    for task in TASKS:
        await crew(task, [])
    await proxy.observer.flush()
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(timeout=30) as client:
        templates = (await client.get(proxy.url + "/admin/templates.json", headers=bearer)).json()
        flows = (await client.get(proxy.url + "/admin/workflows.json", headers=bearer)).json()
    store = await proxy.store()
    assert sorted(len(s["exchanges"]) for s in store.sessions()) == sessions
    assert sorted(tuple(t["turn"] or ()) for t in templates["templates"]) == steps
    [flow] = flows["workflows"]
    assert (flow["nodes"], flow["edges"], len(flow["entries"])) == (len(steps), edges, 1)
