"""Fast headless MuJoCo rendering, shared by every suite and by the simulated robot.

Frame time on a CPU is dominated by shadow maps and multisampling: with the model's
``shadowsize`` and ``offsamples`` at 0 and the scene's shadow, reflection (and, where the
suite has one, skybox) flags off, frames come 10-30x faster (see docs/benchmarks.md).
"""

from __future__ import annotations

from typing import Any

import mujoco
import numpy as np

SLOW_SCENE_FLAGS = (mujoco.mjtRndFlag.mjRND_SHADOW, mujoco.mjtRndFlag.mjRND_REFLECTION)


def fast_model(model: mujoco.MjModel) -> None:
    """No shadow map and no multisampling (read when a GL context is made)."""
    model.vis.quality.shadowsize = 0
    model.vis.quality.offsamples = 0


def fast_scene(scene: mujoco.MjvScene, *, skybox: bool = True) -> None:
    """Shadows and reflections off in a scene (and the skybox unless ``skybox``)."""
    for flag in SLOW_SCENE_FLAGS:
        scene.flags[flag] = 0
    if not skybox:
        scene.flags[mujoco.mjtRndFlag.mjRND_SKYBOX] = 0


def free_render_context(gl_context: Any, mjr_context: mujoco.MjrContext) -> None:
    """Free a simulator's MuJoCo render context (framebuffers, textures) under its own GL
    context, at once.

    ``MjrContext`` frees its GL objects, by number, in whatever GL context is current when
    it goes. Left to the garbage collector, a closed simulator's context went while another
    simulator of the same process was rendering, and took that one's framebuffer with it:
    its frames came back black from then on. An evaluation worker keeps two simulators
    (one per task) and closes the older, so perturbed multi-task evaluations lost whole
    tasks partway (the scene perturbation's reference to its simulator delayed the
    collection). Freeing it twice is harmless: a freed context holds nothing.
    """
    gl_context.make_current()
    mjr_context.free()


class FastOffscreenRenderer:
    """Renders a robosuite simulation's cameras (robosuite and LIBERO) fast, on demand.

    robosuite builds its GL context from the model's quality settings when the
    environment is made, so the context is remade once the model has no shadow map and
    no multisampling. Frames come back as robosuite gives them: bottom-up (OpenGL's row
    order).
    """

    def __init__(self, sim: Any):
        self.sim = sim
        self._ready = False

    def _prepare(self) -> None:
        model = self.sim.model._model
        fast_model(model)
        if self.sim._render_context_offscreen is None:
            from robosuite.utils.binding_utils import MjRenderContextOffscreen

            MjRenderContextOffscreen(self.sim, device_id=-1)
        context = self.sim._render_context_offscreen
        context.con = mujoco.MjrContext(model, mujoco.mjtFontScale.mjFONTSCALE_150)
        fast_scene(context.scn)
        self._ready = True

    def render(self, camera: str, size: int) -> np.ndarray:
        if not self._ready:
            self._prepare()
        # this simulator's GL context, whichever another simulator of the process made
        # current since (a few microseconds against milliseconds for the frame)
        self.sim._render_context_offscreen.gl_ctx.make_current()
        return self.sim.render(camera_name=camera, width=size, height=size)

    def close(self) -> None:
        """Free the render context now (:func:`free_render_context`)."""
        context = self.sim._render_context_offscreen
        if context is not None:
            free_render_context(context.gl_ctx, context.con)
