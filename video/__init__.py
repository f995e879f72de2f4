"""Video: style transfer frame by frame with temporal consistency (Ruder, Dosovitskiy and Brox 2016).

An outer layer, like serve/ and scale/: it builds on engine/ (which never imports it). ``video.run`` is
the frame loop, ``video.flow`` the optical flow and its weights, ``video.io`` the files (PyAV),
``cli/video.py`` (the shell) the ``nst stylize VIDEO`` mode, ``video.measure`` the warping error. See docs/video.md.
"""

# The temporal term's weight beside content 1, style 4, TV 2 (engine.Config's defaults). The term is a mean
# squared pixel difference (0-1 scale) over the frame: an error of 0.05 (13 grey levels) everywhere costs
# 0.0025 x weight. Chosen on the synthetic clip (docs/video.md): 50 left 2.6x the flicker of 200, 1000 held
# the frames so hard that their style loss rose by a fifth.
TEMPORAL_WEIGHT = 200.0
LATER_STEPS = 0.5  # frames after the first: this fraction of --steps, at the output size (docs/video.md)
