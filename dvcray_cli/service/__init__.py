"""The runner service: one Ray Job per cluster that runs experiments without a Ray Job each.

``protocol`` (what both ends speak), ``client`` (its HTTP client), ``server`` and ``table``
(the service: ``python -m dvcray_cli.service``, a module path the nodes run), ``forks`` and
``placed`` (how it starts experiments). Nothing is imported here: a client imports only
``protocol`` and ``client``.
"""
