"""The application on top of the library: the benchmark pipeline, the real-model suite, the command.

* :mod:`neutra_flows.app.bench`: :func:`~neutra_flows.app.bench.run_benchmark`,
  the built-in benchmarks and their goals;
* :mod:`neutra_flows.app.suite`: :func:`~neutra_flows.app.suite.run_suite`,
  NeuTra and NUTS on every real model, one table;
* :mod:`neutra_flows.app.cli`: the ``neutra-flows`` command (``python -m neutra_flows``).

These modules only compose the public API of :mod:`neutra_flows`; nothing in
the library imports them, so ``import neutra_flows`` pays for none of them
(nor for pandas' tables or matplotlib's figures they need).
"""
