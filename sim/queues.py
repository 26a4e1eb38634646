"""Queue orders: the key a policy sorts waiting requests (and picks preemption victims) by.

Smaller keys are served first. Every key ends with the request id, so ties are broken the
same way on every run.
"""

from __future__ import annotations

from collections.abc import Callable

from sim.request import Request

OrderKey = tuple[float, ...]


def fcfs_key(r: Request) -> OrderKey:
    return (r.arrival_s, r.id)


def sjf_key(r: Request) -> OrderKey:
    # Oracle job size: the prompt plus the trace's true output length. A deployed engine only
    # has a prediction of the output length; the oracle gives SJF's best case.
    return (r.prompt_tokens + r.output_tokens, r.arrival_s, r.id)


def priority_key(r: Request) -> OrderKey:
    # Lower priority value first, as in vLLM's priority scheduling.
    return (r.priority, r.arrival_s, r.id)


ORDERS: dict[str, Callable[[Request], OrderKey]] = {
    "fcfs": fcfs_key,
    "sjf": sjf_key,
    "priority": priority_key,
}


def order_key(name: str) -> Callable[[Request], OrderKey]:
    try:
        return ORDERS[name]
    except KeyError:
        raise ValueError(f"unknown queue order {name!r}; known: {', '.join(ORDERS)}") from None
