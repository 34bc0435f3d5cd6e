"""ditvla as a LeRobot policy: ``--policy.type=ditvla`` in LeRobot's own tools.

Importing this package registers the configuration with LeRobot; LeRobot finds the policy
class (``modeling_ditvla.DitvlaPolicy``) and the processors
(``processor_ditvla.make_ditvla_pre_post_processors``) by its naming convention. The
policy is ditvla's own :class:`~ditvla.policies.policy.DiTVLAPolicy`; this package only
maps LeRobot's batches, statistics and folders onto it.
"""

from lerobot_policy_ditvla.configuration_ditvla import DitvlaConfig, DitvlaSettingError

__all__ = ["DitvlaConfig", "DitvlaSettingError"]
