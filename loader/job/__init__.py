"""One job's core, without Ray: what it is (`spec`) and what it has delivered (`ledger`).

`loader.curator.Curator` composes a job from these and a `loader.selection.selector.Selector`.
"""
