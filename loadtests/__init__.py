"""Load tests of the pdp sidecar: Locust profiles, their runner and the wrk ceiling.

`locustfile.py` imports nothing from `pdp` or `sync` (Locust runs on gevent); it reads
its dataset from the JSON manifest the runner writes. The runner (`run.py`) and
`ceiling.py` use pdp only to prepare the database (migrate, seed, the embedded
server), never to answer a check: the sidecar under test is always a `pdp serve`
subprocess.
"""
