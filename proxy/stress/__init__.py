"""`omni-proxy stress`: the proxy under faults and load, measured and checked.

* ``soak``: many requests through a PD proxy while the simulated instances inject every kind of
  fault and one of their processes is stopped for a while (:mod:`proxy.stress.soak`);
* ``large-prompt``: small requests' latency while a 15 MB prompt passes through
  (:mod:`proxy.stress.large_prompt`).

Each prints its figures on stderr and, with ``--json``, one JSON document on stdout;
``--out FILE`` writes that document to a file.
"""
