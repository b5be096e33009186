"""segd's benchmark suite: `python -m bench` (or `make bench`).

Each benchmark measures segd on its own code paths and, in the same run, a
baseline to read the figure against; it prints a table and writes
`bench/results/latest.json`. Benchmarks report; they never fail on a slow
machine. One module per benchmark:

- `enforce`: time from `docker run` / the `start` event to a container's rules
  being in place, one by one and in a burst, and connections leaked meanwhile;
- `pairing`: pairings per second over HTTP against a fixed-response handler,
  and at 16 clients signed requests that do nothing against the same handler;
- `compile`: the policy compiler on 10,000 workloads, full and incremental;
- `apply`: a ruleset and one set element through `Firewall`, against `nft -f`;
- `footprint`: the agent's memory and CPU with 100 enforced containers;
- `flood`: pairing latency while another address floods registrations, and
  the audit rows and store growth the flood leaves;
- `ingest`: flow records the server keeps per second, and pairing latency
  while flows pour in;
- `flows`: the agent's CPU per 1,000 logged packets a second (flow records),
  against reading and parsing them alone; and the time from a packet to its
  flow record in the server's API, against the time to the agent's batch
  leaving;
- `fleet`: the segd mesh on the test bed (three simulated hosts): cross-host
  time to enforce, a host joining, mesh throughput against the underlay, and
  a host's instructions as the fleet grows (pure compiler).
"""

NAMES = (
    "enforce", "pairing", "compile", "apply", "footprint", "flood", "ingest", "flows", "fleet",
)  # fmt: skip
