"""Every Redis key and channel name of the Streams backend, in one place (as arq's constants).

All names start with the deployment's prefix (default "fewstep:"), so several deployments or
test runs share one Redis without meeting. The Lua scripts build the same names from the
same templates: `lua_prelude` below is generated from `TEMPLATES`, so Python and Lua cannot
drift apart. Because the scripts derive key names, the backend needs one Redis (or one shard
with a hash-tagged prefix such as "{fewstep}:"), not a cluster spread over slots.

Layout (P = prefix, MV = "model@version"):

    P jobs:MV:PRIO       stream of queued job ids, one per model version and priority; the
                         consumer group GROUP of all workers reads it (entries: id, n)
    P priorities:MV      set of the priorities MV has streams for
    P models             set of every MV ever submitted (for depth and KEDA discovery)
    P job:ID             hash: data (the Job as JSON), state, n, stream, entry, step, steps,
                         delivery, error, fingerprint, idempotency (the full name of its
                         idempotency key, or ""; expires with the result)
    P result:ID          the JobResult as JSON, written once (SET NX) with a TTL
    P events:ID          stream of the job's events (seq, type, data, time)
    P idempotency:OWNER:KEY  the job id an Idempotency-Key stands for, per principal (OWNER
                         is a principal name, which holds no ":", so the split is unique)
    P counters           hash: jobs, samples queued (admission control, depth, lag)
    P work:MV            hash: priority -> row-steps of MV admitted and not done (queued, or
                         the steps a running job has left), "queued" -> the row-steps
                         not yet claimed (admission by predicted wait), and "seed" -> a
                         worker's engine speed in row-steps/s (the rate until one is measured)
    P dead               dead-letter stream: jobs delivered too often without a result
    P done               channel: "ID\\nN\\nSTATE\\nMV COST QUEUED\\nRESULT-JSON-or-empty" when a
                         job finishes (COST: its row-steps; QUEUED: MV's row-steps not
                         yet claimed, so an API measures drain rates only while work waits)
    P cancel             channel: ID of a running job whose client canceled it
    P ratelimit:NAME     hash: tokens, ts (server time, s) of principal NAME's token bucket;
                         expires once the bucket would be full again
    P inflight:NAME      hash: job id -> "samples expiry" of principal NAME's jobs in flight;
                         entries past their expiry (a replica died) are dropped on the next
                         acquire, and the key expires after the last one
"""

from __future__ import annotations

from dataclasses import dataclass

GROUP = "workers"  # the one consumer group of every job stream

TEMPLATES = {
    "stream": "jobs:{mv}:{priority}",
    "priorities": "priorities:{mv}",
    "models": "models",
    "job": "job:{id}",
    "result": "result:{id}",
    "events": "events:{id}",
    "idempotency": "idempotency:{owner}:{key}",
    "counters": "counters",
    "work": "work:{mv}",
    "dead": "dead",
    "done": "done",
    "cancel": "cancel",
    "ratelimit": "ratelimit:{name}",
    "inflight": "inflight:{name}",
}


def model_version(model: str, version: int) -> str:
    return f"{model}@{version}"


@dataclass(frozen=True)
class Keys:
    """The names under one prefix."""

    prefix: str = "fewstep:"

    def _name(self, kind: str, **parts) -> str:
        return self.prefix + TEMPLATES[kind].format(**parts)

    def stream(self, mv: str, priority: int) -> str:
        return self._name("stream", mv=mv, priority=priority)

    def priorities(self, mv: str) -> str:
        return self._name("priorities", mv=mv)

    @property
    def models(self) -> str:
        return self._name("models")

    def job(self, job_id: str) -> str:
        return self._name("job", id=job_id)

    def result(self, job_id: str) -> str:
        return self._name("result", id=job_id)

    def events(self, job_id: str) -> str:
        return self._name("events", id=job_id)

    def idempotency(self, owner: str, key: str) -> str:
        return self._name("idempotency", owner=owner, key=key)

    @property
    def counters(self) -> str:
        return self._name("counters")

    def work(self, mv: str) -> str:
        return self._name("work", mv=mv)

    @property
    def dead(self) -> str:
        return self._name("dead")

    @property
    def done(self) -> str:
        return self._name("done")

    @property
    def cancel(self) -> str:
        return self._name("cancel")

    def ratelimit(self, name: str) -> str:
        return self._name("ratelimit", name=name)

    def inflight(self, name: str) -> str:
        return self._name("inflight", name=name)

    @property
    def pattern(self) -> str:
        """Every key under this prefix (for SCAN when cleaning up)."""
        return self.prefix.replace("*", r"\*").replace("?", r"\?") + "*"


def lua_prelude() -> str:
    """Lua functions k_<kind>(...) building the names above from the prefix in ARGV[1]."""
    lines = ["local P = ARGV[1]"]
    for kind, template in TEMPLATES.items():
        params, pieces, rest = [], [], template
        while "{" in rest:
            head, _, tail = rest.partition("{")
            name, _, rest = tail.partition("}")
            pieces += [repr(head), name] if head else [name]
            params.append(name)
        if rest:
            pieces.append(repr(rest))
        body = " .. ".join(["P", *pieces])
        lines.append(f"local function k_{kind}({', '.join(params)}) return {body} end")
    return "\n".join(lines) + "\n"
