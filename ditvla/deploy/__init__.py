"""Deployment: the dual-system policy server (System 2 the VLM, System 1 the DiT head),
the robot controller process, action-chunk scheduling, and the transport between them.

A policy is reached only through :mod:`ditvla.contract`; no dataset is read here.
"""
