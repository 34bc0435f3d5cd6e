"""ditvla: a vision-language backbone feeding Diffusion-Transformer heads, for robot
policies. Four parts (``datasets``, ``policies``, ``envs``, ``deploy``) meet in
:mod:`ditvla.contract`; ``training`` fits a policy to a store, ``cli`` is the command."""
