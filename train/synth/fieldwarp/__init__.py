"""Renderer D ("fieldwarp"): its parts (see :mod:`train.synth.render_fieldwarp`).

* :mod:`~train.synth.fieldwarp.scene`: where each tissue lies in every view,
  in centimetres, and the cardiac deformation field that moves it;
* :mod:`~train.synth.fieldwarp.beam`: the acoustics on the Cartesian pixel
  grid (scattering field, oriented point-spread functions, attenuation,
  clutter, noise, log compression);
* :mod:`~train.synth.fieldwarp.screen`: the sector's place on the screen and
  the burned-in annotation (text, depth marks, ECG).
"""
