"""The exact speed paths of the GauGAN networks (docs/MODELS.md, "Speed paths"; config section ``speed``).

The plain networks (``models/generator.py`` ...) read like the official code and reach this
package only through ``seam.py``. Here:

| module | job |
| --- | --- |
| ``seam.py`` | what the plain networks call: the generator's ``ModulationPlan`` / per-forward ``LabelMaps``, the discriminator's ``DiscriminatorLabels`` |
| ``label_maps.py`` | the plan (path per SPADE layer shape) and the label map of one forward (resized once per resolution, class indices, region layouts) |
| ``modulation.py`` | SPADE's gamma/beta on the dense (one fused convolution), gather and region paths; the modulation as one multiply-add |
| ``onehot_conv.py`` | convolutions of a one-hot map as gathers of weight columns |
| ``region_modulation.py`` | gamma/beta once per uniform label region, convolved only near borders |
| ``discriminator_labels.py`` | D's label input: only the channels present, the one-hot part as a gather |
| ``spectral_norm.py`` | spectral norm with a closed-form backward of ``W / sigma`` (torch's state dict) |
| ``choice.py`` | ``auto``: the path per SPADE layer shape timed on the first batch, recorded per run |
"""
