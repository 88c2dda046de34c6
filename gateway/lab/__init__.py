"""The fairness lab: the VTC paper's workloads and metrics, simulation and HTTP replay.

* :mod:`.workloads`: the paper's workloads by name, CSV traces and YAML client descriptions;
* :mod:`.metrics`: the paper's fairness metrics as pure functions over request records;
* :mod:`.simulate`: discrete-event simulation of the gateway's scheduler and admission on the
  simulated engine core, in virtual time;
* :mod:`.replay`: the same workload sent over HTTP by streaming clients;
* :mod:`.report`, :mod:`.plots`: ``results.json``, markdown tables, PNG figures;
* :mod:`.cli`: ``vtc-gateway lab simulate|replay``.
"""
