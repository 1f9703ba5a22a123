"""A reproducible comparison of pdp with its peers: `python -m loadtests.peers`.

The same in-memory dataset (pdp's synthetic seed generator, no database) and the
same queries for pdp's engine, the Cerbos server, OPA's Rego engine, Cedar
(cedarpy) and pycasbin: every engine must agree with pdp on every query it can
express before anything is timed. `dataset` (pure, tested) holds the dataset, the
queries, a naive reference implementation of the rule and the agreement check;
one module per peer encodes the model for it; `bench` times them and writes the
table and plot. See loadtests/README.md, "Peers".
"""
