"""SynthFaces: the embedded procedural world hyperdiff trains and judges on, offline, as one subpackage.

The package's own names are the world: `world` (identities, scenes, seed ranges), `captions` (scenes in words and
back, the background read from an image) and `faces` (`render`; `pen` holds its drawing tools). Its other modules:
`images` (images as tensors), `encoder` (the identity encoder that plays face recognition), `detectors` (scene
fidelity, the scene an image shows), `encoder_training` (its training recipe, augmentations and scores),
`base_model/` (training the tiny SD-shaped base from scratch, stage by stage), `evaluation` (the base-model report),
`fidelity` (the fidelity benchmark), `calibrate` (output gains, fine-tune recipes and schedules chosen on validation
identities), `sheet` (contact sheets), `demo` (`hyperdiff demo`). SynthFaces builds on the core, the hypernet and the
pipeline; the core never imports it.
"""

from hyperdiff.synthfaces import captions, faces, world
from hyperdiff.synthfaces.captions import *  # noqa: F403 (the world's names, each module's `__all__`)
from hyperdiff.synthfaces.faces import *  # noqa: F403
from hyperdiff.synthfaces.world import *  # noqa: F403

__all__ = [*world.__all__, *captions.__all__, *faces.__all__]
