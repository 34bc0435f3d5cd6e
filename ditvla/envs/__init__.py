"""Simulators behind one observation schema (Meta-World, robosuite, LIBERO), their
scripted experts, demonstration collection, the baselines and the rollout evaluator.

A policy is reached only through :mod:`ditvla.contract`; simulator packages are imported
only when their suite is used.
"""
