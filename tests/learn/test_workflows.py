"""The workflow graph, instances and predictions, on hand-made transitions."""

from __future__ import annotations

import json
import random

import pytest

from learn.histogram import Histogram
from learn.instances import Instances
from learn.workflows import WorkflowGraph


def run_loop(graph: WorkflowGraph, loops: int, steps: int, seed: int = 0) -> None:
    """A tool loop: A asks for a tool `steps` times (template B each time), then answers."""
    rng = random.Random(seed)
    for _ in range(loops):
        graph.observe_call("tA", "tools:search", 1.0, root=True, created=True, first="tA")
        prev, kind = "tA", "tools:search"
        for i in range(steps):
            nxt_kind = "tools:search" if i < steps - 1 else "text"
            graph.observe_call("tB", nxt_kind, 1.0, root=False, created=False, depth=i + 1)
            graph.observe_edge(prev, kind, "tB", data=False, gap=rng.uniform(1, 2), new_source=True,
                               new_target=True, src_depth=i)
            prev, kind = "tB", nxt_kind


def test_probabilities_follow_the_answer_kind_and_depth():
    graph = WorkflowGraph()
    run_loop(graph, loops=10, steps=3)
    assert [d for d, _, _ in graph.next("tA", "tools:search")] == ["tB"]
    # after a text answer nothing follows; after a tool request the loop goes on
    assert graph.next("tB", "text") == []
    (dst, p, _), = graph.next("tB", "tools:search", depth=1)
    assert dst == "tB" and p == pytest.approx(1.0)


def test_edges_carry_gap_fan_out_and_kind():
    graph = WorkflowGraph()
    for i in range(4):  # one expert answer feeds a summariser; three experts feed it each time
        graph.observe_call("tE", "text", 1.0, root=True, created=(i % 3 == 0), first="tE")
    graph.observe_call("tS", "text", 1.0, root=False, created=False)
    for new_target in (True, False, False):
        graph.observe_edge("tE", "text", "tS", data=True, gap=3.0, new_source=True, new_target=new_target)
    edge = graph.edge("tE", "tS")
    assert edge.count == 3 and edge.fan_in == 3.0 and edge.fan_out == 1.0
    assert edge.data_flow == 1.0 and 2.0 <= edge.gap_p50 <= 5.0
    assert edge.probability == pytest.approx(3 / 4)


def test_workflow_ids_do_not_depend_on_arrival_order():
    pairs = [("t1", "t2"), ("t2", "t3"), ("t4", "t5")]
    ids = set()
    for order in (pairs, pairs[::-1]):
        graph = WorkflowGraph(min_support=1)
        for src, dst in order:
            for t in (src, dst):
                graph.observe_call(t, "text", None, root=t in ("t1", "t4"), created=t in ("t1", "t4"))
            graph.observe_edge(src, "text", dst, False, 1.0, True, True)
        ids.add(tuple(sorted((w.id, len(w.nodes)) for w in graph.workflows())))
    assert len(ids) == 1
    assert sorted(n for _, n in ids.pop()) == [2, 3]


def test_rename_folds_a_template_into_another():
    graph = WorkflowGraph(min_support=1)
    run_loop(graph, loops=3, steps=2)
    before = graph.nodes["tB"].calls
    graph.observe_call("tB2", "text", 1.0, False, False)
    graph.observe_edge("tA", "tools:search", "tB2", False, 1.0, True, True)
    graph.rename("tB2", "tB")
    assert "tB2" not in graph.nodes and graph.nodes["tB"].calls == before + 1
    assert graph.edge("tA", "tB").count == 4
    assert graph.workflow_of("tA") == graph.workflow_of("tB")


def test_snapshot_round_trips_through_json():
    graph = WorkflowGraph()
    run_loop(graph, loops=5, steps=3)
    again = WorkflowGraph.restore(json.loads(json.dumps(graph.snapshot())))
    assert again.workflows() == graph.workflows()
    for template, kind, depth in [("tA", "tools:search", 0), ("tB", "tools:search", 1), ("tB", "text", 3)]:
        assert [(d, p) for d, p, _ in again.next(template, kind, depth)] == \
            [(d, p) for d, p, _ in graph.next(template, kind, depth)]


def test_graph_memory_is_bounded():
    graph = WorkflowGraph(max_nodes=50, max_edges=80)
    for i in range(1000):
        graph.observe_call(f"t{i}", "text", None, True, True)
        graph.observe_edge(f"t{i}", "text", f"t{i + 1}", False, 1.0, True, True)
    assert len(graph.nodes) <= 50 and len(graph.edges) <= 80


@pytest.mark.parametrize("together, joined", [(0.5, True), (0.001, False)])
def test_roots_started_together_form_one_instance(together, joined):
    inst = Instances(together=together)
    a = inst.join("c1", "tA", 100.0, "", [])
    b = inst.join("c2", "tB", 100.01, "", [])
    assert a.created and a.root
    assert (b.instance == a.instance) is joined and b.created is not joined


def test_data_flow_merges_instances():
    inst = Instances(together=0.0)
    a = inst.join("c1", "tA", 100.0, "", [])
    b = inst.join("c2", "tB", 200.0, "", [])
    assert a.instance != b.instance
    c = inst.join("c3", "tC", 300.0, "", ["c1", "c2"])
    assert c.instance == inst.of("c1") == inst.of("c2") == a.instance
    assert c.absorbed == (("tB", 1),) and not c.root


def test_histogram_quantiles_and_merge():
    h, other = Histogram(), Histogram()
    for x in (0.3, 0.4, 0.45, 3.0):
        h.add(x)
    other.add(30.0)
    h.merge(other)
    assert h.n == 5 and 0.3 <= h.quantile(0.5) <= 0.45 and h.quantile(1.0) == pytest.approx(30.0)
    assert Histogram.from_json(json.loads(json.dumps(h.to_json()))).buckets == h.buckets


@pytest.mark.parametrize("value", [0.001, 0.05, 2.0, 75.0, 3000.0])
def test_a_constant_gap_is_reported_as_itself(value):
    h = Histogram()
    for _ in range(5):
        h.add(value)
    assert h.quantile(0.5) == pytest.approx(value) and h.mean == pytest.approx(value)
