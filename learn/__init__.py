"""Pure algorithms over exchanges: sessions, templates, workflow DAGs, predictions.

Nothing here does I/O: no aiohttp, SQLAlchemy or torch imports.

    learner.py    Learner: the facade the proxy feeds (observe), snapshot/restore, LearnConfig
    sessions.py   SessionLinker: explicit ids, prefix continuation, rewritten histories
    tokens.py     FallbackTokenizer: stable word-level ids when no engine tokenizer is given
    radix.py      RadixTree: token prefixes shared by sessions and tenants, static prefixes
    templates.py  TemplateMiner: message templates with {slots} (align.py: the generalising)
    calls.py      CallRegistry: call templates (leading messages, tools, newest turn)
    dataflow.py   FlowIndex: which earlier answers a prompt contains
    instances.py  Instances: calls of one workflow run (linked, or started together)
    workflows.py  WorkflowGraph: transitions between call templates, one DAG per workflow
    predict.py    Predictor: the calls expected next, and the prefixes worth keeping warm
    histogram.py  Histogram: gap and duration distributions
    canonical.py  canonical JSON and content hashes
"""
