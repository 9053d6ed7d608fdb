"""Renderer C ("scatter") of the synthetic archive, by concern.

The parts behind :mod:`train.synth.render_scatter`, its public entry point
(which holds the independence rule that covers this whole package):
:mod:`~train.synth.scatter.hearts` models each view's heart (tissue classes,
boundaries, motion, valves, pose), :mod:`~train.synth.scatter.beamform` turns
a posed heart into moving scatterers and beamforms each frame's echo envelope
with its propagation effects, and :mod:`~train.synth.scatter.display` lays out
the sector, log-compresses, grey-maps and scan-converts the envelopes and
burns in the overlay.  Import the renderer through
:mod:`train.synth.render_scatter`.
"""
