"""Policies: the VLM backbone, the DiT action and foresight heads, noise schedules, the
normalizer, the composed policy (``policy.DiTVLAPolicy``) and post-training quantization.

This part knows no dataset, simulator or runtime: a policy is configured from a
:class:`~ditvla.contract.DataSpec` and speaks the contract in :mod:`ditvla.contract`.
"""
