"""The delivery engine: one small service per role, after River's worker.

| module | role |
|---|---|
| `policy.py` | what applies to each URL: secret, timeout, retries, rate, breaker, order |
| `slots.py` | pure: per-URL queues and request slots, the global in-flight bound |
| `gate.py` | pure: when writers should NOTIFY (the runtime.sleeping flag) |
| `flag.py` | wake-up flags, and waiting on several without a task each |
| `producer.py` | wake-ups -> fan out + claim -> slots |
| `executor.py` | one claimed delivery -> HTTP -> a result (retry decision, metrics, log) |
| `completer.py` | batched acknowledgement (group commit), idempotent re-sends |
| `maintenance.py` | heartbeat, dead-daemon reaping, URL refresh, prune, gauges |
| `site.py` | wires one database's services together and runs their lifecycle |
"""
