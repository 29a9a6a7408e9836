"""Load testing the `generate` model with Locust, checking every answer.

traffic (what to send and what must come back), ledger (every request gets exactly one outcome), report
(the summary and the verdict), locustfile (the Locust glue), runner / local_server / memory / bench (behind
`python -m loadtest` and the make targets loadtest, loadtest-local, loadtest-ui, soak and loadtest-bench).
"""
