"""Bench policy names -> configuration of the whole stack. The one place that mapping lives.

A bench policy names one configuration of the stack: the worker's scheduling policy now; later issues add
their own names here (BE orders `arrival`, `ltr`, `speculative`, `oracle` = worker fcfs + router
`--be-order <name>`; KV pin policies = a kvmanager flag, KV memory
policies = a worker flag). Names compose with "+": `qllm+ltr` applies both parts; two parts may not set the
same thing.

To add a name: one `Part(...)` line in POLICIES with the flags it adds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from qllm.up import StackConfig


@dataclass(frozen=True)
class Part:
    help: str
    worker_policy: str | None = None  # StackConfig.policy (`qllm worker --policy`)
    # the worker policy when no other part of the name sets one (`ltr` = fcfs, `qllm+ltr` = qllm)
    default_worker_policy: str | None = None
    worker_args: tuple[str, ...] = ()
    router_args: tuple[str, ...] = ()
    kvmanager_args: tuple[str, ...] = ()


POLICIES: dict[str, Part] = {
    # The FCFS baseline is FCFS end to end: one arrival-ordered queue in the router too, so LS does not
    # skip the router's backlog of BE work.
    "fcfs": Part("worker: iteration-level first come first served (vLLM's default); router: one FIFO queue",
                 worker_policy="fcfs", router_args=("--queue-mode", "fifo")),
    "priority": Part("worker: iteration-level priority exactly as vLLM V1 --scheduling-policy priority (LS "
                     "first from the waiting queue; running BE is preempted only when KV runs short)",
                     worker_policy="priority"),
    "qllm": Part("worker: LS preempts a running BE batch at a decoder-layer boundary, BE resumes from the "
                 "saved layer; LS streams decode in steps of their own at their pace", worker_policy="qllm"),
    "priority-evict": Part("worker: priority that also preempts running BE for waiting LS and serves running LS "
                           "first", worker_policy="priority-evict"),
    # Ablations: qllm with one mechanism switched off, so each figure says what that mechanism buys.
    "qllm-no-park": Part("worker: qllm without layer-boundary parking (LS waits for the running step to end)",
                         worker_policy="qllm", worker_args=("--no-layer-parking",)),
    "qllm-no-inner-park": Part("worker: qllm parking only between a layer's blocks (not inside them: no decode "
                               "row groups, prefill parts or expert ranges)",
                               worker_policy="qllm", worker_args=("--no-inner-parking",)),
    "qllm-no-ls-steps": Part("worker: qllm without LS-only steps for LS that arrives between steps",
                             worker_policy="qllm", worker_args=("--no-ls-only-steps",)),
    "qllm-no-reserve": Part("worker: qllm without the LS KV and slot reserve in BE admission", worker_policy="qllm",
                            worker_args=("--ls-reserved-kv-tokens", "0", "--ls-reserved-slots", "0")),
    "qllm-no-pacing": Part("worker: qllm without LS decode pacing (LS decodes ride full BE iterations)",
                           worker_policy="qllm", worker_args=("--ls-tpot-target-ms", "0")),
    # The LS TPOT target traded against BE throughput: qllm with a looser pacing target (the default is 2x
    # the measured one-row decode step), so a run shows what each LS token time costs BE.
    **{f"qllm-tpot-{ms}": Part(f"worker: qllm with LS decode pacing at a {ms} ms TPOT target", worker_policy="qllm",
                               worker_args=("--ls-tpot-target-ms", str(ms))) for ms in (25, 50, 100)},
    # ... and the token budget of BE iterations beside LS streams (by default the full budget, 512): a smaller
    # one makes BE prefill chunks smaller (more passes over the weights per prompt token).
    **{f"qllm-budget-{n}": Part(f"worker: qllm with a {n}-token budget for BE iterations beside LS streams",
                                worker_policy="qllm", worker_args=("--ls-active-max-batched-tokens", str(n)))
       for n in (128, 256, 512)},
    # ... and how many LS steps for due tokens may run in a row before BE gets its turn (by default 2; 1 was the
    # default before c23f47c's faster one-row step, docs/benchmarks.md "Thirteenth session").
    **{f"qllm-defer-{n}": Part(f"worker: qllm letting {n} LS steps for due tokens run in a row before BE's turn",
                               worker_policy="qllm", worker_args=("--max-be-deferral-steps", str(n)))
       for n in (1, 2, 4)},
    # BE orders (the router's queue decides which BE request a worker starts next; the worker runs fcfs).
    "arrival": Part("router: BE in arrival order (the baseline of the BE orders); worker: fcfs",
                    default_worker_policy="fcfs", router_args=("--be-order", "arrival")),
    "ltr": Part("router: BE shortest predicted output first (vllm-ltr: the predictor's RankLengths score), "
                "with starvation prevention; worker: fcfs", default_worker_policy="fcfs",
                router_args=("--be-order", "ltr")),
    "speculative": Part("router: BE least estimated remaining time first (ALISE: the predictor's EstimateTime); "
                        "worker: fcfs", default_worker_policy="fcfs", router_args=("--be-order", "speculative")),
    "oracle": Part("router: BE true output length first (max_tokens, as the bench sends ignore_eos; an upper "
                   "bound for ltr, benchmarks only); worker: fcfs",
                   default_worker_policy="fcfs", router_args=("--be-order", "oracle")),
    # KV pin policies for agent programs (the kvmanager decides whether and how long a finished turn's KV stays
    # pinned on its worker; `qllm kvmanager --pin-policy <name>`).
    # no-pin also sets the worker's provisional pin (kept until the kvmanager's answer arrives) to 0 s, so a
    # tool that returns within that window does not find its KV: the baseline frees it at the turn's end.
    "no-pin": Part("kvmanager: never pin; worker: no provisional pin either, a turn's KV is freed when it ends "
                   "(vLLM)", kvmanager_args=("--pin-policy", "no-pin"), worker_args=("--provisional-pin-s", "0")),
    "fixed-ttl": Part("kvmanager: pin for a fixed 2 s when the next tool's mean duration is <= 2 s (Continuum's "
                      "baseline)", kvmanager_args=("--pin-policy", "fixed-ttl")),
    "ttl": Part("kvmanager: pin with a TTL from the predicted tool duration, the recompute cost, the turn count "
                "and memory pressure (ours)", kvmanager_args=("--pin-policy", "ttl")),
    "pin-forever": Part("kvmanager: pin every non-final turn until the program's next turn (the oracle)",
                        kvmanager_args=("--pin-policy", "pin-forever")),
    # KV memory under pressure (`qllm worker --kv-policy <name>`, issue 7); all run the worker's
    # `priority-evict` policy (LS admission preempts BE, which is where the KV policies differ) unless another
    # part of the name sets one. BE requests carry the predictor's length estimate to the worker in all but
    # alise-oracle: without one the worker falls back to max_tokens, which the bench's ignore_eos makes the
    # exact length (an oracle). recompute carries it too, so that the worker orders its waiting BE work alike.
    "recompute": Part("worker: a preempted request's KV is dropped and recomputed later (vLLM V1); worker policy "
                      "priority-evict; router: BE carries the predictor's length estimate",
                      default_worker_policy="priority-evict", worker_args=("--kv-policy", "recompute"),
                      router_args=("--be-length-estimates", "predictor")),
    "alise": Part("worker: KV victims by class then longest predicted remaining time (router: BE carries the "
                  "predictor's length estimate), each swapped to host, quantized to int8 (BE only) or recomputed, "
                  "whichever the measured cost model finds cheapest (ALISE); worker policy priority-evict",
                  default_worker_policy="priority-evict", worker_args=("--kv-policy", "alise"),
                  router_args=("--be-length-estimates", "predictor")),
    "alise-oracle": Part("alise with BE's true remaining length (router: max_tokens, exact under the bench's "
                         "ignore_eos) in place of the predictor's: an upper bound for alise, benchmarks only",
                         default_worker_policy="priority-evict", worker_args=("--kv-policy", "alise"),
                         router_args=("--be-length-estimates", "oracle")),
}

#: the bench policies that are KV pin policies: `<name>` = kvmanager `--pin-policy <name>`
PIN_POLICIES = ("no-pin", "fixed-ttl", "ttl", "pin-forever")

#: the bench policies that are BE orders: `<name>` = worker fcfs + router `--be-order <name>`
BE_ORDERS = ("arrival", "ltr", "speculative", "oracle")


class UnknownPolicy(ValueError):
    pass


def known() -> list[str]:
    return list(POLICIES)  # the order above: baselines first


def parts(name: str) -> list[Part]:
    pieces = [p.strip() for p in name.split("+")]
    unknown = [p for p in pieces if p not in POLICIES]
    if not name.strip() or unknown:
        raise UnknownPolicy(f"unknown bench policy {name!r}"
                            + (f" (unknown part {', '.join(map(repr, unknown))})" if unknown and '+' in name else "")
                            + f"; known: {', '.join(known())} (combine with '+')")
    return [POLICIES[p] for p in pieces]


def parse_list(text: str) -> list[str]:
    """"fcfs,priority" -> ["fcfs", "priority"], every name checked."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise UnknownPolicy(f"no policy given; known: {', '.join(known())}")
    if len(set(names)) != len(names):
        raise UnknownPolicy(f"--policies {text!r} names a policy twice")
    for n in names:
        apply(n, StackConfig())  # unknown names and conflicting parts fail here, before any stack starts
    return names


def apply(name: str, base: StackConfig) -> StackConfig:
    """The stack configuration that `name` names, on top of `base` (host, ports, model, logs)."""
    worker_policy = default_policy = None
    worker_args, router_args, kv_args = list(base.worker_args), list(base.router_args), []
    router_flags: dict[str, str] = {}  # flag -> its value, over the parts of this name
    kv_flags: dict[str, str] = {}
    for part in parts(name):
        if part.worker_policy is not None:
            if worker_policy is not None and worker_policy != part.worker_policy:
                raise UnknownPolicy(f"bench policy {name!r} sets the worker policy twice")
            worker_policy = part.worker_policy
        default_policy = default_policy or part.default_worker_policy
        for flag, value in zip(part.router_args[::2], part.router_args[1::2]):
            if flag in router_flags and router_flags[flag] != value:
                raise UnknownPolicy(f"bench policy {name!r} sets the router's {flag} twice")
            router_flags[flag] = value
        for flag, value in zip(part.kvmanager_args[::2], part.kvmanager_args[1::2]):
            if flag in kv_flags and kv_flags[flag] != value:
                raise UnknownPolicy(f"bench policy {name!r} sets the kvmanager's {flag} twice")
            kv_flags[flag] = value
        worker_args += part.worker_args
        router_args += part.router_args
        kv_args += part.kvmanager_args
    if router_flags.get("--queue-mode") == "fifo" and router_flags.get("--be-order", "arrival") != "arrival":
        raise UnknownPolicy(f"bench policy {name!r}: the router's fifo queue (fcfs) serves everything in arrival "
                            "order, so a BE order has no effect there; use the order alone (worker fcfs)")
    worker_policy = worker_policy or default_policy
    changes: dict = {"worker_args": worker_args, "router_args": router_args}
    if worker_policy is not None:
        changes["policy"] = worker_policy
    if kv_args:
        changes["kvmanager_args"] = [*base.kvmanager_args, *kv_args]
    return dataclasses.replace(base, **changes)


def describe(name: str, base: StackConfig | None = None) -> dict:
    """What the report records about a policy: the stack settings it changes."""
    cfg = apply(name, base or StackConfig())
    out = {"worker_policy": cfg.policy, "worker_args": list(cfg.worker_args), "router_args": list(cfg.router_args)}
    out["kvmanager_args"] = list(cfg.kvmanager_args)
    return out
