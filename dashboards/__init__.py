"""Grafana dashboards as code (``generate.py``) and the Prometheus alert rules (``rules/``).

Not part of the installed distribution: the generated JSON and the rule file are the artefacts.
"""
