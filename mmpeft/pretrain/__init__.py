"""Pretraining of mmpeft's own quickstart backbones on their embedded upstream tasks (digits today;
shapes and diffusion later). This is training, so it lives here and not in `mmpeft.backbones`: a
backbone asks for its weights by name (`mmpeft.backbones.weights.build_weights`) and each module here is
registered as the builder of one backbone's weights in `mmpeft/__init__.py`."""
