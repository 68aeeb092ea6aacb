"""Kafka and Faust glue: the worker app, its agents, clients and the CLI."""
